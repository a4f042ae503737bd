"""The one-step design (issue 18): the pipeline's recommended sampling computes exactly the trained prediction, the
curriculum's weights, the resumable loop with its budget exports, and the on-the-fly crops."""

import numpy
import pytest
import torch
from PIL import Image

from latentup.autoencoders.taesd import TAESD
from latentup.diffusion.precond import KarrasDenoiser
from latentup.data.shards import ShardWriter
from latentup.errors import ConfigError, InputError
from latentup.nn.unet import UNet, UNetConfig
from latentup.pipeline import Upscaler
from latentup.training.one_step import RECOMMENDED, Curriculum, Recipe, export, one_step_loss, predict, train
from latentup.training.one_step_data import ImageCrops, half_size, shard_stream
from latentup.weights.single_file import load_upscaler

TINY = {"in_channels": 8, "out_channels": 4, "channels": (32, 64), "depths": (1, 1), "self_attn": (False, False),
        "cross_attn": (False, False), "cross_attention_dim": None, "head_dim": 32, "mapping_dim": 64,
        "mapping_cond_dim": 128}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_recommended_sampling_is_the_trained_prediction(tmp_path):
    """Upscaler.sample with the weights' recommendation (euler, 1 step, exponential grid) returns D(σ_max n; σ_max)
    for the seed's starting noise n: the function the one-step loss trains."""
    torch.manual_seed(0)
    denoiser = KarrasDenoiser(UNet(UNetConfig(**TINY))).eval()
    path = export(tmp_path / "m.safetensors", denoiser, None, {})
    upscaler = Upscaler.from_pretrained(path, autoencoder=TAESD(), dtype="float32")
    low_res = torch.randn(1, 4, 8, 8)
    settings = upscaler.settings()
    assert (settings.sampler, settings.steps, settings.schedule) == ("euler", 1, "exponential")
    sampled = upscaler.upscale_latent(low_res, seed=[3])
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = predict(denoiser, low_res, noise.float())
    torch.testing.assert_close(sampled, expected, atol=2e-5, rtol=1e-5)
    assert load_upscaler(path).meta["recommended"] == RECOMMENDED


def test_curriculum_weights():
    c = Curriculum(latent_l1=1.0, latent_final=0.2, latent_only=10, ramp=4)
    assert c.weights(0) == (1.0, 0.0) and c.weights(9) == (1.0, 0.0)
    assert c.weights(10) == pytest.approx((0.8, 0.25)) and c.weights(13) == pytest.approx((0.2, 1.0))
    assert Curriculum(latent_final=0.1).weights(0) == pytest.approx((0.1, 1.0))  # no latent-only phase: pixels from the start
    with pytest.raises(ConfigError, match="curriculum.ramp"):
        Curriculum(ramp=-1)


def test_loss_scores_the_decoded_window_against_the_pixels():
    """In the pixel phase the loss is a·|ẑ − z_hr|₁ + b·(pixel_l1·|dec(ẑ[W]) − HR[W]|₁ + pixel_mse·|…|₂² + lpips·d);
    a decoder that maps a latent pixel to an 8×8 block shows the window and the reference line up."""
    torch.manual_seed(0)
    denoiser = KarrasDenoiser(UNet(UNetConfig(**TINY)))
    batch = {"hr": torch.randn(2, 4, 8, 8), "lr": torch.randn(2, 4, 4, 4),
             "hr_pixels": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)}

    def decode(z):  # first 3 channels, each latent px an 8x8 block
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    def distance(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    curriculum = Curriculum(latent_final=0.5, pixel_l1=2.0, pixel_mse=4.0, lpips=3.0, window=4)
    loss, terms = one_step_loss(denoiser, batch, 0, curriculum, decode, distance, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(batch["hr"].shape, generator=generator)
    top, left = (int(torch.randint(0, 5, (), generator=generator)) for _ in range(2))
    out = predict(denoiser, batch["lr"], noise)
    image = decode(out[..., top:top + 4, left:left + 4])
    reference = batch["hr_pixels"][..., 8 * top:8 * top + 32, 8 * left:8 * left + 32].float() / 255
    expected = (0.5 * (out - batch["hr"]).abs().mean() + 2.0 * (image - reference).abs().mean()
                + 4.0 * (image - reference).square().mean() + 3.0 * distance(image, reference).mean())
    torch.testing.assert_close(loss, expected)
    assert set(terms) == {"latent_l1", "pixel_l1", "pixel_mse", "lpips"}


def random_batches(step):
    generator = torch.Generator().manual_seed(step)
    while True:
        yield {"hr": torch.randn(2, 4, 8, 8, generator=generator), "lr": torch.randn(2, 4, 4, 4, generator=generator),
               "hr_pixels": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator)}


def test_training_exports_at_each_mark_and_resumes(tmp_path):
    """Budgets on the wall clock: an export per mark with the one-step recommendation; a second call with a
    larger budget resumes the step count from last.pt."""
    recipe = Recipe(unet=TINY, curriculum={"latent_only": 1, "window": 4}, batch_size=2, bf16=False)
    decode = TAESD().decoder.eval().requires_grad_(False)
    logs = []
    first = train(recipe, random_batches, tmp_path, budgets=[0.05], clock="wall", decode=decode, lpips=None,
                  log=logs.append)
    assert first.name == "at_0s.safetensors" and load_upscaler(first).meta["recommended"] == RECOMMENDED
    steps = torch.load(tmp_path / "last.pt", weights_only=True)["step"]
    assert steps >= 1
    second = train(recipe, random_batches, tmp_path, budgets=[0.05, 0.5], clock="wall", decode=decode, lpips=None,
                   log=logs.append)
    assert second.name == "at_0s.safetensors" or second.name.startswith("at_")
    assert any(line.startswith(f"resumed {tmp_path / 'last.pt'} at step {steps}") for line in logs)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] > steps
    assert load_upscaler(second).meta["training"]["steps"] > steps


def test_recipe_files_and_their_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("batch_size: 4\ncurriculum: {window: 8}\n")
    assert Recipe.from_file(path).batch_size == 4
    path.write_text("batchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        Recipe.from_file(path)


def test_crops_are_pure_functions_of_the_step_and_lr_follows_pil(shared_dir):
    """The same step gives the same crops; each of the 8 symmetries is distinct; the LR is PIL's bicubic ×½
    within one grey level on a photo (both antialiased, a = −0.5; sharp synthetic edges differ by up to 5)."""
    image = torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8)
    crops = ImageCrops([image], encode=lambda x: x[:, :, ::8, ::8], batch_size=3, crop=32, seed=5)
    a, b = crops.batch(4), crops.batch(4)
    assert torch.equal(a["hr_pixels"], b["hr_pixels"]) and a["hr_pixels"].shape == (3, 3, 32, 32)
    assert not torch.equal(a["hr_pixels"], crops.batch(5)["hr_pixels"])
    square = torch.arange(3 * 32 * 32).reshape(3, 32, 32).to(torch.uint8)
    cut = ImageCrops([square], encode=lambda x: x, batch_size=64, crop=32).batch(0)["hr_pixels"]
    symmetries = {tuple(t.flatten().tolist()) for k in range(4) for t in (square.rot90(k, (1, 2)),
                                                                          square.rot90(k, (1, 2)).flip(2))}
    assert {tuple(c.flatten().tolist()) for c in cut} == symmetries  # all 8, and nothing else
    crops.fill_pool(5)  # a pool: batches draw its crops, with their stored latents and re-cut pixels
    pooled = crops.batch(0)
    assert torch.equal(crops.encode(pooled["hr_pixels"].float() / 255).half().float(), pooled["hr"])
    assert len(crops.pool[0]) == 5 and torch.equal(pooled["hr_pixels"], crops.batch(0)["hr_pixels"])
    photo = Image.open(sorted((shared_dir / "datasets" / "eval" / "Set5").glob("*.png"))[1]).convert("RGB")
    photo = photo.crop((0, 0, 128, 128))
    pil = numpy.array(photo.resize((64, 64), Image.BICUBIC)).astype(int)
    ours = half_size(torch.from_numpy(numpy.array(photo)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert abs(ours.astype(int) - pil).max() <= 1


def test_shard_stream_resumes_and_limits_the_pool(tmp_path):
    """Batches from step k are those a run from step 0 reaches at step k; ``limit`` keeps to the first pairs and
    accepts an unfinished preparation."""
    writer = ShardWriter(tmp_path, {"test": 1}, shard_size=4)
    for i in range(6):
        writer.add(f"k{i}", hr=torch.full((4, 2, 2), float(i)), lr=torch.zeros(4, 1, 1),
                   hr_pixels=torch.zeros(3, 16, 16, dtype=torch.uint8))
        writer.end_source(i + 1)
    writer.flush(6)  # not complete
    stream = shard_stream(tmp_path, batch_size=2, seed=0, limit=4)
    from_start = stream(0)
    batches = [next(from_start)["hr"][:, 0, 0, 0].tolist() for _ in range(4)]
    assert sorted(batches[0] + batches[1]) == [0, 1, 2, 3] and sorted(batches[2] + batches[3]) == [0, 1, 2, 3]
    assert next(stream(3))["hr"][:, 0, 0, 0].tolist() == batches[3]
    with pytest.raises(InputError, match="fewer than the 7"):
        shard_stream(tmp_path, batch_size=2, limit=7)
    with pytest.raises(InputError, match="only partly prepared"):
        shard_stream(tmp_path, batch_size=2)
