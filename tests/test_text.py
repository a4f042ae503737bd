"""Text conditioning: tokenizer ids vs transformers, text tower vs transformers CLIPTextModel and open_clip (fp32 CPU)."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import save_file

from latentup.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError
from latentup.text import CLIPTextConditioner, CLIPTokenizer, TextTowerConfig, write_hf_tokenizer_files

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RELEASED_CONFIG = Path("/work/shared/spec/text_encoder_config.json")
PROMPTS = [
    "",
    "a photo of a cat",
    "Hello, World!!! ... (really?) [yes] {no} #42 @home 100% a+b=c",
    "naïve café — “quoted” ‘single’ 日本語のテキスト 🙂 👨‍👩‍👧 🇫🇷 ΟΔΟΣ İstanbul Straße ﬁne ＡＢＣ e\u0301",
    "1234567890 3.14159 1e-5 -7 $100 2nd 10x",
    "a very long prompt " * 40,
    "MiXeD CaSe WORDS And Don't It's We're I'LL You've",
    "  extra   \t whitespace \n\n here  \u00a0 nbsp \u3000 ideographic ",
    "a<|endoftext|>b <|startoftext|> <|ENDOFTEXT|>",
    "&amp; &lt;tag&gt; \\ / | ~ ` ^ _ ''' ''s",
]
SMALL_HF = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, layer_norm_eps=1e-5)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory) -> Path:
    return write_hf_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


def hf_tokens(folder: Path, prompts: list[str]):
    # transformers 5's CLIPTokenizer is this class; in 4.x the slow CLIPTokenizer also ran ftfy.fix_text
    reference = transformers.CLIPTokenizerFast.from_pretrained(folder)
    return reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")


def test_tokenizer_matches_transformers(hf_tokenizer_folder):
    ids, mask = CLIPTokenizer.bundled()(PROMPTS)
    reference = hf_tokens(hf_tokenizer_folder, PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), 77) and mask.dtype == torch.bool
    assert torch.equal(ids, reference.input_ids)
    assert torch.equal(mask, reference.attention_mask.bool())
    assert ids[0, :3].tolist() == [49406, 49407, 49407] and mask[0].sum() == 2  # empty prompt: BOS, EOT, EOT padding
    assert ids[5, -1] == 49407 and mask[5].all()  # truncated to 75 tokens + BOS + EOT


def test_tokenizer_vocabulary_is_clips(hf_tokenizer_folder):
    """Known CLIP ids, open_clip's own tokenizer (0-padded) on plain text, and the HF-folder reader."""
    ids, _ = CLIPTokenizer.bundled()(["a photo of a cat"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    plain = ["a photo of a cat", "Hello, World!!! 42", "MiXeD CaSe don't", "a very long prompt " * 40]
    ours, mask = CLIPTokenizer.bundled()(plain)
    theirs = open_clip.tokenize(plain)
    assert torch.equal(ours.where(mask, 0), theirs)
    from_folder = CLIPTokenizer.from_hf(hf_tokenizer_folder)(PROMPTS)
    bundled = CLIPTokenizer.bundled()(PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(from_folder, bundled))


def save_hf_text_model(folder: Path, config: transformers.CLIPTextConfig, seed: int = 0) -> transformers.CLIPTextModel:
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    model.save_pretrained(folder)
    return model


def compare_with_transformers(ours: CLIPTextConditioner, reference: transformers.CLIPTextModel, prompts) -> dict:
    ids, mask = ours.tokenizer(prompts)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
    errors = {}
    for skip, index in ((0, -1), (1, -1), (2, -2)):
        cond = ours.encode(prompts, clip_skip=skip)
        errors[f"context(clip_skip={skip})"] = relative_error(cond.context, out.hidden_states[index])
        errors["pooled"] = relative_error(cond.pooled, out.pooler_output)
        assert torch.equal(cond.mask, mask)
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)  # the context is pre-final-LN
    return errors


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_matches_transformers_small(tmp_path, activation):
    reference = save_hf_text_model(tmp_path, transformers.CLIPTextConfig(**SMALL_HF, hidden_act=activation))
    ours = CLIPTextConditioner.from_hf(tmp_path)
    assert ours.config.activation == activation and ours.config.mlp_width == 96
    compare_with_transformers(ours, reference, PROMPTS)


def test_transformers_4_layouts(tmp_path):
    """``text_model.``-prefixed keys with position_ids (transformers 4, CLIPModel) and pytorch_model.bin."""
    reference = save_hf_text_model(tmp_path / "v5", transformers.CLIPTextConfig(**SMALL_HF))
    state = {f"text_model.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["text_projection.weight"] = torch.zeros(8, 64)
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    torch.save(state, tmp_path / "v4" / "pytorch_model.bin")
    compare_with_transformers(CLIPTextConditioner.from_hf(tmp_path / "v4"), reference, PROMPTS[:3])


def test_matches_transformers_released_config(tmp_path):
    config = json.loads(RELEASED_CONFIG.read_text())
    assert config["eos_token_id"] == 2  # legacy pooling rule: argmax of the ids = first 49407
    reference = save_hf_text_model(tmp_path, transformers.CLIPTextConfig.from_dict(config))
    ours = CLIPTextConditioner.from_hf(tmp_path)
    assert ours.config == TextTowerConfig()
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    compare_with_transformers(ours, reference, [*PROMPTS[:4], PROMPTS[8]])  # [8]: a literal EOT mid-prompt


def small_open_clip(quick_gelu: bool) -> open_clip.CLIP:
    torch.manual_seed(0)
    text = open_clip.CLIPTextCfg(width=128, heads=2, layers=3, mlp_ratio=3.0)
    vision = open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_matches_open_clip_checkpoint(tmp_path, quick_gelu):
    model = small_open_clip(quick_gelu)
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}  # DDP-style prefix
    save_file(state, tmp_path / "clip.safetensors")
    config = None if quick_gelu else TextTowerConfig(width=128, heads=2, layers=3, mlp_width=384, activation="gelu")
    ours = CLIPTextConditioner.from_open_clip(tmp_path / "clip.safetensors", config)
    assert ours.config.heads == 2 and ours.config.activation == ("quick_gelu" if quick_gelu else "gelu")

    ids, _ = ours.tokenizer(PROMPTS)
    with torch.no_grad():  # open_clip's own pieces: embeddings, causal transformer, ln_final, argmax pooling
        x = model.token_embedding(ids) + model.positional_embedding
        last, (penultimate,) = model.transformer.forward_intermediates(x, attn_mask=model.attn_mask, indices=[1])
        pooled = model.ln_final(last)[torch.arange(len(ids)), ids.argmax(dim=1)]
        features = model.encode_text(ids)
    errors = {}
    for skip, reference in ((1, last), (2, penultimate)):
        cond = ours.encode(PROMPTS, clip_skip=skip)
        errors[f"context(clip_skip={skip})"] = relative_error(cond.context, reference)
    errors["pooled"] = relative_error(cond.pooled, pooled)
    errors["projected pooled vs encode_text"] = relative_error(cond.pooled @ model.text_projection, features)
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors


def test_open_clip_model_names():
    assert TextTowerConfig.from_open_clip_model("ViT-L-14-quickgelu") == TextTowerConfig()
    assert TextTowerConfig.from_open_clip_model("ViT-L-14").activation == "gelu"
    assert TextTowerConfig.from_open_clip_model("ViT-H-14").width == 1024
    with pytest.raises(ConfigError):
        TextTowerConfig.from_open_clip_model("no-such-model")


@pytest.mark.slow
def test_matches_open_clip_vit_l14(tmp_path):
    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "vit_l14.pt")
    ours = CLIPTextConditioner.from_open_clip(tmp_path / "vit_l14.pt", "ViT-L-14-quickgelu")
    ids, _ = ours.tokenizer(PROMPTS[:3])
    with torch.no_grad():
        pooled = ours.encode(PROMPTS[:3]).pooled
        error = relative_error(pooled @ model.text_projection, model.encode_text(ids))
    print(f"ViT-L-14 projected pooled vs encode_text: {error:.2e}")
    assert error <= 1e-4


def test_encode_contract():
    ours = CLIPTextConditioner(TextTowerConfig(width=32, layers=2, heads=2, mlp_width=64))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    cond = ours.encode(["a photo of a cat", ""])
    assert cond.context.shape == (2, 77, 32) and cond.pooled.shape == (2, 32) and cond.mask.shape == (2, 77)
    assert cond.mask.sum(1).tolist() == [7, 2] and not cond.context.requires_grad
    assert torch.equal(cond.context, ours.encode(["a photo of a cat", ""], clip_skip=0).context)
    assert not torch.allclose(cond.context, ours.encode(["a photo of a cat", ""], clip_skip=2).context)
    assert ours.double().encode("a cat").context.dtype == torch.float64


@pytest.mark.parametrize("clip_skip", [-1, 3, 1.0, True, "1"])
def test_bad_clip_skip(clip_skip):
    ours = CLIPTextConditioner(TextTowerConfig(width=32, layers=2, heads=2, mlp_width=64))
    with pytest.raises(ConfigError, match="clip_skip"):
        ours.encode(["a cat"], clip_skip=clip_skip)


def test_mismatched_weights(tmp_path):
    reference = save_hf_text_model(tmp_path / "hf", transformers.CLIPTextConfig(**SMALL_HF))
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "encoder.layers.1.self_attn.q_proj.weight"}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(state, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(WeightsMismatchError, match="self_attn"):
        CLIPTextConditioner.from_hf(tmp_path / "broken")

    save_file({k: v.contiguous() for k, v in small_open_clip(True).state_dict().items()}, tmp_path / "clip.safetensors")
    with pytest.raises(WeightsMismatchError, match="shape mismatch"):
        CLIPTextConditioner.from_open_clip(tmp_path / "clip.safetensors", TextTowerConfig(width=128, heads=2, layers=3, mlp_width=256))
    with pytest.raises(WeightsMismatchError, match="missing"):
        CLIPTextConditioner.from_open_clip(tmp_path / "clip.safetensors", TextTowerConfig(width=128, heads=2, layers=4, mlp_width=384))
    save_file({"conv.weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsMismatchError, match="missing"):
        CLIPTextConditioner.from_open_clip(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="differs"):
        CLIPTextConditioner.load(tmp_path / "hf", TextTowerConfig())
    with pytest.raises(WeightsNotFoundError):
        CLIPTextConditioner.from_hf(tmp_path / "nowhere")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="cannot read weights"):
        CLIPTextConditioner.from_open_clip(tmp_path / "junk.pt")


def test_hydra_configs(tmp_path):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        clip_l = compose("text_encoder/clip_l")
        none = compose("text_encoder/none")
    assert none.text_encoder is None
    assert instantiate(clip_l.text_encoder.config) == TextTowerConfig()
    clip_l.text_encoder.config.update(width=32, layers=2, heads=2, mlp_width=64)
    ours = instantiate(clip_l.text_encoder)
    assert isinstance(ours, CLIPTextConditioner) and ours.encode(["a cat"]).context.shape == (1, 77, 32)
