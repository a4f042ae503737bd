"""Training: schedules, EMA, the counter-based draws, the LightningModule (loss falls, text path), exact resume
after a kill (and the step progress bar), DDP parity, and the exports (diffusers UNet2DConditionModel parity,
pipeline loading)."""

import csv
import math
import os
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_data import make_images

from latentup.data.datamodule import PairDataModule
from latentup.data.prepare import PrepareSettings, prepare_pairs
from latentup.data.shards import LatentShardDataset
from latentup.diffusion.densities import random_words, standard_normal, uniform_pairs
from latentup.diffusion.precond import KarrasDenoiser
from latentup.diffusion.schedules import make_sigmas
from latentup.nn.unet import UNetConfig
from latentup.training.ema import ema_decay, ema_update
from latentup.training.export import export_checkpoint
from latentup.training.module import UpscalerModule, as_unet_config
from latentup.training.schedules import InverseLR, inverse_lr_factor

REPO = Path(__file__).resolve().parents[1]
TINY = {"channels": (32, 64, 64), "depths": (1, 1, 1), "self_attn": (False, False, True), "cross_attn": (False,) * 3,
        "cross_attention_dim": None, "head_dim": 32, "mapping_dim": 64, "mapping_cond_dim": 128}
TINY_OVERRIDES = ["model.unet.channels=[32,64,64]", "model.unet.depths=[1,1,1]", "model.unet.mapping_dim=64",
                  "model.unet.head_dim=32", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
                  "data.module.num_workers=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


class KillAt(L.Callback):
    """SIGKILL the training process right after optimizer step ``step`` (no cleanup, no final checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from latentup.autoencoders import load_autoencoder

    root = tmp_path_factory.mktemp("train")
    images = make_images(root / "images", sizes=((200, 150), (260, 140), (140, 140), (300, 220), (160, 200)))
    settings = PrepareSettings(source=str(images), autoencoder="taesd", crop=128, crops_per_image=3, seed=0)
    prepare_pairs(settings, root / "pairs", load_autoencoder("taesd"), progress=False)
    return root / "pairs"


def train_py(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python train.py`` in a subprocess (runs under ``run_dir``)."""
    environment = {**os.environ, "LATENTUP_RUNS": str(run_dir), "PYTHONPATH": str(Path(__file__).parent),
                   "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300, check=False)


def losses(run: Path) -> list[float]:
    rows = []
    for file in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += [float(r["train/loss"]) for r in csv.DictReader(file.open()) if r.get("train/loss")]
    return rows


def test_inverse_lr_and_ema_decay():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = InverseLR(optimizer, inv_gamma=20000, power=1, warmup=0.99)
    rates = []
    for _ in range(3):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-4 * (1 - 0.99 ** (t + 1)) / (1 + t / 20000) for t in range(3)], rel=1e-12)
    assert inverse_lr_factor(20000, warmup=0.0) == pytest.approx(0.5)
    assert ema_decay(0) == 0.0 and ema_decay(31622) == pytest.approx(0.999, abs=1e-6)
    assert ema_decay(10**7) == 0.9999
    ema, live = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        live.weight.normal_()
        live.running_mean.normal_()
    before = ema.weight.clone()
    ema_update(ema, live, 0.75)
    assert torch.allclose(ema.weight, 0.75 * before + 0.25 * live.weight)
    assert torch.equal(ema.running_mean, live.running_mean)  # buffers copied, not averaged


def ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance of the sample ``u`` to U(0, 1)."""
    u = u.double().flatten().sort().values
    i = torch.arange(1, len(u) + 1, dtype=torch.float64)
    return max(float((i / len(u) - u).max()), float((u - (i - 1) / len(u)).max()))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_counter_draws_are_splitmix_uniform_and_normal():
    """The words equal a Python reference of the hash (SplitMix64's finaliser); the uniforms pass a KS test and the
    normals have mean 0, std 1, a normal CDF and no correlation between neighbouring indices or positions."""
    mask = 2**64 - 1

    def finalise(x: int) -> int:
        x = (x ^ x >> 30) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ x >> 27) * 0x94D049BB133111EB & mask
        return x ^ x >> 31

    assert finalise(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # SplitMix64's first output for seed 0
    key, positions = 2**62 + 12345, torch.tensor([0, 7, 2**40])
    expected = [[finalise(finalise((key + ((p << 20) + j) * 0x9E3779B97F4A7C15) & mask)) for j in range(6)]
                for p in positions.tolist()]
    assert [[w & mask for w in row] for row in random_words(key, positions, 6).tolist()] == expected

    u = uniform_pairs(random_words(1, torch.arange(256), 512))  # 2^18 uniforms
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert ks_uniform(u) < 1.95 / math.sqrt(u.numel())  # KS at α = 0.001
    z = standard_normal(2, torch.arange(512), (4, 16, 16)).flatten(1)  # 2^19 normals
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n) and abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)
    assert ks_uniform(torch.special.ndtr(z.double())) < 1.95 / math.sqrt(n)
    for a, b in [(z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z[:, 0::2], z[:, 1::2])]:  # indices, positions, pairs
        assert abs(correlation(a, b)) < 5 / math.sqrt(a.numel())
    assert abs(correlation(z[:, 0::2] ** 2, z[:, 1::2] ** 2)) < 5 / math.sqrt(n / 2)  # Box–Muller pairs independent


def test_training_draws_follow_the_densities_and_ignore_batch_composition():
    """σ, σ_lr, caption drop and noise of module.draws: a sample's draws are bit-identical in any batch (subset,
    order), differ between seeds, and follow lognormal(-0.5, 1.2), ½·δ₀ + ½·U(0, 0.6), Bernoulli(0.1)."""
    module = UpscalerModule(TINY, caption_dropout=0.1, seed=3, validation={"lpips": False})
    shapes = (4, 16, 16), (4, 8, 8)
    full = module.draws(torch.arange(4096), *shapes)
    generator = torch.Generator().manual_seed(0)
    for size in (1, 3, 128):
        subset = torch.randperm(4096, generator=generator)[:size]
        part = module.draws(subset, *shapes)
        assert all(torch.equal(part[k], full[k][subset]) for k in full)
    other = UpscalerModule(TINY, seed=4, validation={"lpips": False}).draws(torch.arange(8), *shapes)
    assert not torch.equal(other["noise"], full["noise"][:8])
    n = 4096
    log_sigma = full["sigma"].log()
    assert abs(float(log_sigma.mean()) + 0.5) < 5 * 1.2 / math.sqrt(n)
    assert abs(float(log_sigma.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * n)
    assert ks_uniform(torch.special.ndtr((log_sigma.double() + 0.5) / 1.2)) < 1.95 / math.sqrt(n)
    augmented = full["sigma_lr"][full["sigma_lr"] > 0]
    assert abs(len(augmented) / n - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert float(augmented.max()) < 0.6 and ks_uniform(augmented / 0.6) < 1.95 / math.sqrt(len(augmented))
    assert abs(float(full["drop"].float().mean()) - 0.1) < 5 * 0.3 / math.sqrt(n)
    for noise, shape in zip((full["noise"], full["lr_noise"]), shapes):
        assert noise.shape == (n, *shape)
        assert abs(float(noise.mean())) < 5 / math.sqrt(noise.numel()) and abs(float(noise.std()) - 1) < 0.01
    assert abs(correlation(full["noise"].flatten(1)[:, -1], full["lr_noise"].flatten(1)[:, 0])) < 5 / math.sqrt(n)


def test_posterior_noise_is_keyed_by_stream_position():
    """On-the-fly encoding with a KL VAE: z = mean + std·ε, ε a function of (seed, position), not of the batch."""
    from latentup.autoencoders.kl import AutoencoderKL, KLConfig

    vae = AutoencoderKL(KLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)).eval()
    module = UpscalerModule(TINY, autoencoder=vae, validation={"lpips": False})
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = {"hr_pixels": pixels, "lr_pixels": pixels[..., ::2, ::2]}
    hr, lr = module.latents(batch, torch.tensor([5, 6, 7, 8]))
    sub_hr, sub_lr = module.latents({k: v[[2, 0]] for k, v in batch.items()}, torch.tensor([7, 5]))
    assert torch.allclose(sub_hr, hr[[2, 0]], atol=1e-5) and torch.allclose(sub_lr, lr[[2, 0]], atol=1e-5)
    mean = module.latents(batch, sample=False)[0]
    assert torch.allclose(mean, vae.encode(pixels, sample=False), atol=1e-6)
    assert (hr - mean).abs().mean() > 0.01


@pytest.mark.filterwarnings("ignore:.*eval mode")
def test_loss_falls_on_generated_images(shards, tmp_path):
    """A tiny model trained 60 steps: the loss on a fixed batch (fixed σ, noise) drops by a third."""
    L.seed_everything(0)
    module = UpscalerModule(TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3), seed=0,
                            validation={"lpips": False})
    data = PairDataModule(lambda: LatentShardDataset(shards), batch_size=8, num_workers=0)
    data.setup("fit")
    fixed = next(iter(data.train_dataloader()))

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(module.forward_loss(fixed).mean())

    before = fixed_loss()
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    after = fixed_loss()
    assert after < 0.67 * before, (before, after)
    assert int(module.ema_updates) == module.ema_step == 60
    ema_gap = max((a - b).abs().max() for a, b in zip(module.model_ema.parameters(), module.model.parameters()))
    assert 0 < ema_gap < 1  # the EMA lags the live weights


def test_text_conditioned_step_uses_empty_prompt_for_dropped_captions():
    from latentup.text import CLIPTextConditioner, TextTowerConfig

    text = CLIPTextConditioner(TextTowerConfig(width=64, layers=1, heads=2, mlp_width=128)).eval()
    config = {**TINY, "cross_attn": (False, True, True), "cross_attention_dim": 64, "mapping_cond_dim": 128 + 64}
    module = UpscalerModule(config, text_encoder=text, caption_dropout=0.5, validation={"lpips": False})
    module.empty_prompt = module._empty_prompt()
    drop = torch.tensor([True, False])
    cond = module.text({"caption": ["a cat", "a dog"]}, drop)
    empty, dog = text.encode([""]), text.encode(["a dog"])
    assert cond.keys() == {"context", "pooled", "mask"}
    for key in cond:
        expected = torch.cat([getattr(empty, key), getattr(dog, key)])
        assert cond[key].shape == expected.shape and cond[key].dtype == expected.dtype, key
        assert torch.allclose(cond[key].float(), expected.float(), atol=1e-5), key
        assert not torch.equal(expected[0], expected[1]), key  # the empty and the kept prompt differ in every key
    batch = {"hr": torch.randn(2, 4, 16, 16), "lr": torch.randn(2, 4, 8, 8), "caption": ["a cat", "a dog"],
             "position": torch.tensor([0, 1])}
    loss = module.forward_loss(batch)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_pixel_batches_are_encoded_on_the_fly(shards):
    from latentup.autoencoders import load_autoencoder
    from latentup.data.datasets import ImageCropDataset
    from latentup.data.stream import EpochStream

    taesd = load_autoencoder("taesd").eval()
    module = UpscalerModule(TINY, autoencoder=taesd, validation={"lpips": False})
    data = PairDataModule(ImageCropDataset(shards.parent / "images", crop=128), batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    hr, lr = module.latents(batch)
    with torch.no_grad():
        assert torch.equal(hr, taesd.encode(batch["hr_pixels"])) and lr.shape == (2, 4, 8, 8)
        assert torch.isfinite(module.forward_loss(batch)).all()
    assert isinstance(data.train_dataloader().dataset, EpochStream)


def test_validation_scores_model_and_latent_bicubic(shards, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from latentup.autoencoders import load_autoencoder
    from latentup.data.datasets import ImageEvalDataset
    from latentup.evaluation.metrics import psnr
    from latentup.evaluation.protocol import bicubic2x

    taesd = load_autoencoder("taesd").eval()
    module = UpscalerModule(TINY, autoencoder=taesd, validation={"steps": 2, "grid_images": 1})
    evaluation = ImageEvalDataset(shards.parent / "images", limit=2)
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False)
    scores = trainer.validate(module, datamodule=PairDataModule(None, evaluation))[0]
    assert {"val/psnr", "val/lpips", "val/psnr_latent_bicubic", "val/lpips_latent_bicubic", "val/loss"} <= scores.keys()
    baselines = []
    for item in (evaluation[0], evaluation[1]):
        with torch.no_grad():
            picture = taesd.decode(bicubic2x(taesd.encode(item["lr_pixels"][None])))
        baselines.append(float(psnr(picture, item["hr_pixels"][None])[0]))
    assert abs(baselines[0] - baselines[1]) > 0.1  # the mean takes both images
    assert scores["val/psnr_latent_bicubic"] == pytest.approx(sum(baselines) / 2, abs=1e-3)
    assert len(list(tmp_path.rglob("val_grids/*.png"))) == 1


def test_killed_run_resumes_to_identical_weights(shards, tmp_path):
    common = [f"data.root={shards}", *TINY_OVERRIDES, "trainer.max_steps=8", "data.module.batch_size=3",
              "callbacks.checkpoint.every_n_train_steps=3", "debug=deterministic"]
    full = train_py(tmp_path, "name=full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = train_py(tmp_path, "name=cut", *common, "+callbacks.kill._target_=test_training.KillAt",
                      "+callbacks.kill.step=5")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["last.ckpt", "step0000003.ckpt"]
    resumed = train_py(tmp_path, "name=cut", *common, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    bar = resumed.stdout.split("\r")
    assert any("Training steps" in line and " 3/8 " in line for line in bar)  # starts at the restored step
    assert any("Training steps: 100%" in line and " 8/8 " in line for line in bar)
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "cut/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # weights, EMA, buffers
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert losses(tmp_path / "full")[3:] == losses(tmp_path / "cut")[-5:]
    exported = load_file(tmp_path / "cut" / "export" / "model.safetensors")
    assert torch.equal(exported["unet.conv_out.weight"], a["state_dict"]["model_ema.unet.conv_out.weight"])


def test_ddp_two_cpu_processes_match_one_process(shards, tmp_path):
    """2 gloo ranks with batch 2 = 1 process with batch 4: same losses, same weights after 2 steps."""
    common = [f"data.root={shards}", *TINY_OVERRIDES, "trainer.max_steps=2"]
    ddp = train_py(tmp_path, "name=ddp", *common, "trainer=ddp_cpu", "data.module.batch_size=2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = train_py(tmp_path, "name=single", *common, "trainer=cpu", "data.module.batch_size=4")
    assert single.returncode == 0, single.stderr[-3000:]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    a, b = (torch.load(tmp_path / run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
            for run in ("ddp", "single"))
    assert max((a[k].float() - b[k].float()).abs().max() for k in a) < 1e-6


def _text_config() -> UNetConfig:
    """A tiny text-conditioned U-Net that diffusers' K blocks can build."""
    return UNetConfig(channels=(32, 64, 64), depths=(1, 2, 1), self_attn=(False, False, True),
                      cross_attn=(False, True, True), cross_attention_dim=48, head_dim=32, mapping_dim=64,
                      mapping_cond_dim=128 + 48)


def _checkpoint_of(module: UpscalerModule, path: Path) -> Path:
    with torch.no_grad():
        for p in module.model_ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial EMA weights (conv_out starts at zero)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_export_loads_in_diffusers_with_equal_outputs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    module = UpscalerModule(_text_config(), meta={"autoencoder": "taesd"}, validation={"lpips": False})
    written = export_checkpoint(_checkpoint_of(module, tmp_path / "m.ckpt"), tmp_path / "export")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(written["diffusers"]).eval()
    ours = module.model_ema.unet.eval()
    x, c_noise = torch.randn(2, 8, 16, 24), torch.tensor([0.3, -0.7])
    mapping, context = torch.randn(2, 176), torch.randn(2, 77, 48)
    with torch.no_grad():
        expected = ours(x, c_noise, mapping_cond=mapping, context=context)
        got = theirs(x, c_noise, encoder_hidden_states=context, timestep_cond=mapping).sample
    assert (got - expected).abs().max() <= 1e-4
    single = load_file(written["single_file"])
    assert torch.equal(single["noise_fourier.weight"], module.noise_fourier)
    assert all(torch.equal(single[f"unet.{k}"], v) for k, v in ours.state_dict().items())


def test_export_writes_tuned_sampler_settings(tmp_path):
    from latentup.errors import ConfigError
    from latentup.pipeline import Upscaler

    module = UpscalerModule(TINY, meta={"autoencoder": "taesd", "recommended": {"steps": 24, "sampler": "euler"}},
                            validation={"lpips": False})
    checkpoint = _checkpoint_of(module, tmp_path / "m.ckpt")
    written = export_checkpoint(checkpoint, tmp_path / "export", recommended={"sampler": "dpmpp_2m", "steps": 4})
    settings = Upscaler.from_pretrained(written["single_file"]).settings()
    assert (settings.sampler, settings.steps, settings.schedule) == ("dpmpp_2m", 4, "log_linear")
    for bad, message in (({"sampler": "nope"}, "nope"), ({"stepz": 4}, "stepz"), ("dpmpp_2m", "mapping"),
                         ({"steps": 4.5}, r"steps must be >= 1 \(an integer\)"), ({"steps": "four"}, "an integer")):
        with pytest.raises(ConfigError, match=message):
            export_checkpoint(checkpoint, tmp_path / "bad", recommended=bad)
    assert not (tmp_path / "bad").exists()


def test_exports_run_in_the_pipeline(tmp_path):
    from latentup.pipeline import Upscaler

    module = UpscalerModule(TINY, meta={"autoencoder": "taesd"}, validation={"lpips": False})
    written = export_checkpoint(_checkpoint_of(module, tmp_path / "m.ckpt"), tmp_path / "export")
    assert "diffusers" not in written  # diffusers has no cross-attention-free K-block U-Net
    upscaler = Upscaler.from_pretrained(written["single_file"])
    latent = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    out = upscaler.upscale_latent(latent, steps=2, seed=1, noise_level=0.2)
    assert torch.equal(upscaler.upscale_latent(latent, steps=2, seed=1, noise_level=0.2), out)
    # by hand: sample i's generator (seed 1 + i) draws the initial noise, then the low-res noise ε; the U-Net sees
    # nearest_2x(z + 0.2 ε) / sqrt(1.04) and the Fourier embedding of log1p(0.2); two Euler steps
    sigmas = make_sigmas("log_linear", 2)
    generators = [torch.Generator().manual_seed(1 + i) for i in range(2)]
    x = torch.cat([torch.randn(1, 4, 16, 24, generator=g) for g in generators]) * sigmas[0]
    eps = torch.cat([torch.randn(1, 4, 8, 12, generator=g) for g in generators])
    image_cond = F.interpolate(latent + 0.2 * eps, scale_factor=2, mode="nearest") / math.sqrt(1.04)
    phase = 2 * math.pi * math.log1p(0.2) * module.noise_fourier[:, 0]
    mapping = torch.cat([phase.cos(), phase.sin()]).expand(2, -1)
    denoiser = KarrasDenoiser(upscaler.unet)
    with torch.no_grad():
        for sigma, sigma_next in pairwise(sigmas):
            x = x + (x - denoiser(x, sigma, image_cond, mapping)) / sigma * (sigma_next - sigma)
    assert (out - x).abs().max() <= 1e-5 * x.abs().max()  # measured 6e-6 at scale 2.5
    assert (out - upscaler.upscale_latent(latent, steps=2, seed=1)).abs().max() > 0.1 * x.abs().max()  # 0.92
    text_module = UpscalerModule(_text_config(), validation={"lpips": False})
    folder = export_checkpoint(_checkpoint_of(text_module, tmp_path / "t.ckpt"), tmp_path / "text")["diffusers"]
    from latentup.weights.sources import resolve_weights

    parts = resolve_weights(folder)
    assert parts.unet_config == text_module.unet_config
    assert all(torch.equal(parts.unet_state[k], v) for k, v in text_module.model_ema.unet.state_dict().items())


def test_foreign_checkpoints_are_refused_in_one_line(tmp_path):
    from latentup.errors import WeightsMismatchError
    from latentup.training.checkpoint_io import AtomicCheckpointIO

    class Payload:
        def __reduce__(self):
            return print, ("unpickled",)

    torch.save({"latentup": Payload()}, tmp_path / "evil.ckpt")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    for name, why in (("evil.ckpt", "UnpicklingError"), ("garbage.pth", "Error"), ("plain.ckpt", "no 'latentup'")):
        message = f"{name} is not a latentup training checkpoint loadable with weights_only=True \\(.*{why}.*\\): use"
        with pytest.raises(WeightsMismatchError, match=message):
            export_checkpoint(tmp_path / name, tmp_path / "export")
        with pytest.raises(WeightsMismatchError, match=message):  # validate and resume load through Lightning
            AtomicCheckpointIO().load_checkpoint(tmp_path / name)
    assert not (tmp_path / "export").exists()


@pytest.fixture(scope="module")
def train_script():
    """train.py as a module, to run its stages on composed configs in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("overrides", "message"), [
    (["threads=-1"], "threads must be a whole number >= 1 or null"),
    (["threads=abc"], "threads must be a whole number >= 1 or null .*got 'abc'"),
    (["stage=prepare", "data.prepare.settings.crop=abc"], r"data.prepare.settings.crop must be >= 1 \(an integer\)"),
    (["stage=prepare", "data.prepare.settings.align=0"], r"data.prepare.settings.align must be >= 1 \(an integer\)"),
    (["stage=prepare", "data.prepare.settings.crops_per_image=0"], r"crops_per_image must be >= 1 \(an integer\)"),
    (["data.prepare.settings.max_side=-5"], r"max_side must be >= 1 \(an integer or null\)"),
    (["export.dtype=int8"], "export.dtype must be float16, bfloat16, float32 or null"),
    (["stage=export", "ckpt_path={tmp}/evil.ckpt"], "evil.ckpt is not a latentup training checkpoint"),
    (["stage=validate", "ckpt_path={tmp}/evil.ckpt"], "evil.ckpt is not a latentup training checkpoint"),
    (["ckpt_path={tmp}/evil.ckpt"], "evil.ckpt is not a latentup training checkpoint"),
    (["stage=prepare", "data.prepare.settings.source={tmp}/missing"], "check data.prepare.settings.source"),
])
def test_train_refuses_bad_input_before_any_work(train_script, tmp_path, monkeypatch, overrides, message):
    from hydra import compose, initialize_config_dir

    from latentup.errors import LatentupError

    monkeypatch.setenv("LATENTUP_RUNS", str(tmp_path / "runs"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "evil.ckpt")  # not a training checkpoint
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", overrides=[o.format(tmp=tmp_path) for o in overrides])
    threads = torch.get_num_threads()
    with pytest.raises(LatentupError, match=message):
        train_script.run(cfg)
    assert torch.get_num_threads() == threads
    assert not (tmp_path / "runs").exists()  # no shard folder, logs or export


def test_train_cli_prints_one_error_line(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    result = train_py(tmp_path, "stage=export", f"ckpt_path={tmp_path / 'garbage.pth'}")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "use a checkpoint written by train.py" in result.stderr
    assert not (tmp_path / "default" / "export").exists()


@pytest.mark.parametrize("experiment", ["quickstart", "sd_x2", "finetune"])
def test_experiment_configs_compose(experiment):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=False)
    unet = UNetConfig(**{k: tuple(v) if not isinstance(v, (int, type(None))) else v for k, v in cfg.model.unet.items()})
    if experiment == "quickstart":
        assert unet.cross_attention_dim is None and cfg.text_encoder is None and cfg.autoencoder.spec == "taesd"
        assert cfg.trainer.accelerator == "cpu"
    else:
        assert unet == UNetConfig() and cfg.model.caption_dropout > 0 and cfg.data.prepare.text
        assert math.isclose(cfg.optim.optimizer.lr, 1e-4 if experiment == "sd_x2" else 2e-5)
    assert cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize("experiment", ["default_x2", "default_x2_cpu"])
def test_default_model_recipes_build_the_bundled_architecture(experiment, monkeypatch):
    """The committed recipes of the bundled model compose into its U-Net; the CPU one continues from its weights."""
    from hydra import compose, initialize_config_dir

    from latentup.pipeline import default_weights
    from latentup.weights.sources import resolve_weights

    monkeypatch.delenv("LATENTUP_INIT", raising=False)
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=False)
    bundled = resolve_weights(default_weights())
    assert as_unet_config(OmegaConf.to_container(cfg.model.unet)) == bundled.unet_config
    assert cfg.text_encoder is None and cfg.autoencoder.spec == bundled.autoencoder == "taesd"
    if experiment == "default_x2_cpu":
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.model.init_weights == "bundled"
        module = UpscalerModule(bundled.unet_config, init_weights="bundled", validation={"lpips": False})
        assert all(torch.equal(v.float(), bundled.unet_state[k].float())
                   for k, v in module.model_ema.unet.state_dict().items())
    assert set(cfg.data.module.train) == {"_target_", "_partial_", "root"}  # shard datasets take no crop keys
    settings = cfg.data.prepare.settings
    suffix = ("-dihedral" if settings.dihedral else "") + ("-pixels" if settings.pixels else "")
    assert cfg.data.prepare.name == f"taesd-256px-x{settings.crops_per_image}{suffix}"  # other settings, other folder
    assert settings.dihedral == (experiment == "default_x2_cpu")
    assert (cfg.model.decoder_loss is not None) == (experiment == "default_x2_cpu")
    if cfg.model.decoder_loss is not None:
        assert settings.pixels == (cfg.model.decoder_loss.reference == "pixels")  # the reference is in the shards
