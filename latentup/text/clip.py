"""CLIP text conditioning on open_clip's text transformer (SPEC §1.4, §3.3, §4.5).

ids t [B, T] (BOS … EOT, EOT padding) → h_0 = E[t] + P → h_l = Block_l(h_{l-1}) under a causal mask, l = 1…L:
- context = h_{L-s+1} for clip skip s ∈ 1…L (s = 0 means 1, the hosted API's "no skip"): a state *before* the
  final LayerNorm, transformers' ``hidden_states[-s]``; s = 1 is what the released model uses;
- pooled = LN_final(h_L) at the first EOT (transformers' ``pooler_output``, no text projection);
- mask = True over BOS … EOT (the tokenizer's attention mask; the original model's cross-attention keep-mask).
The state dict uses open_clip's text-tower layout (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.*`` with fused ``attn.in_proj``, ``ln_final``).
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import Tensor, nn

from latentup.errors import ConfigError, WeightsNotFoundError
from latentup.text.tokenizer import CLIPTokenizer
from latentup.weights.files import read_state_dict
from latentup.weights.strict import build_strict

ACTIVATIONS = {
    "quick_gelu": QuickGELU,  # x * sigmoid(1.702 x), OpenAI CLIP
    "gelu": nn.GELU,
    "gelu_new": partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
}
OPEN_CLIP_TEXT_OPTIONS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "proj_type",
                          "proj_bias", "output_tokens"}  # the projection options do not touch what we compute
OPEN_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")
HF_LAYER_NAMES = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                  "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
HF_TEXT_KEYS = ("embeddings.", "encoder.", "final_layer_norm.")
HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


@dataclass(frozen=True)
class TextTowerConfig:
    """A CLIP text tower; the defaults are CLIP ViT-L/14's (123,060,480 parameters)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    vocab_size: int = 49408
    context_length: int = 77
    eps: float = 1e-5
    eot_token_id: int = 49407  # pooled position: first occurrence of this id

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown text activation {self.activation!r}; use one of {sorted(ACTIVATIONS)}")
        if self.width % self.heads:
            raise ConfigError(f"text width {self.width} is not divisible by heads {self.heads}; fix the text tower config")

    @classmethod
    def from_hf(cls, config: dict) -> "TextTowerConfig":
        """From a transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` with ``text_config``).

        transformers pools at argmax(ids) when ``eos_token_id == 2`` (legacy configs such as the released
        one); with CLIP's vocabulary that is the first EOT 49407.
        """
        config = config.get("text_config", config)
        try:
            eos = config.get("eos_token_id", 49407)
            return cls(
                width=config["hidden_size"], layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                mlp_width=config["intermediate_size"], activation=config.get("hidden_act", "quick_gelu"),
                vocab_size=config.get("vocab_size", 49408), context_length=config.get("max_position_embeddings", 77),
                eps=config.get("layer_norm_eps", 1e-5), eot_token_id=49407 if eos == 2 else eos,
            )
        except KeyError as key:
            raise ConfigError(f"text encoder config.json lacks {key}; pass a transformers CLIPTextModel config") from None

    @classmethod
    def from_open_clip_model(cls, name: str) -> "TextTowerConfig":
        """From an open_clip model config name (e.g. ``ViT-L-14-quickgelu``), read from open_clip's bundled files."""
        from open_clip import get_model_config

        model = get_model_config(name)
        if model is None:
            raise ConfigError(f"unknown open_clip model {name!r}; use a name from open_clip.list_models()")
        text = model["text_cfg"]
        unsupported = sorted(set(text) - OPEN_CLIP_TEXT_OPTIONS)
        if unsupported:
            raise ConfigError(f"open_clip model {name!r} has text options {unsupported} that latentup does not support; use a plain CLIP text tower")
        width = text.get("width", 512)
        return cls(width=width, layers=text.get("layers", 12), heads=text.get("heads", 8),
                   mlp_width=int(width * text.get("mlp_ratio", 4.0)),
                   activation="quick_gelu" if model.get("quick_gelu") else "gelu",
                   vocab_size=text.get("vocab_size", 49408), context_length=text.get("context_length", 77))

    @classmethod
    def from_open_clip_state(cls, state: dict[str, Tensor]) -> "TextTowerConfig":
        """From open_clip text-tower tensor shapes, with OpenAI's conventions: heads = width / 64, QuickGELU."""
        if not {"token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"} <= state.keys():
            return cls()  # not a CLIP text tower: load_strict will name the missing keys
        vocab_size, width = state["token_embedding.weight"].shape
        layers = len({key.split(".")[2] for key in state if key.startswith("transformer.resblocks.")})
        return cls(width=width, layers=layers, heads=max(width // 64, 1),
                   mlp_width=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                   vocab_size=vocab_size, context_length=state["positional_embedding"].shape[0])


@dataclass
class TextCond:
    """Text conditioning for the U-Net: context [B, T, D], pooled [B, D], mask [B, T] bool (True = keep)."""

    context: Tensor
    pooled: Tensor
    mask: Tensor


class CLIPTextConditioner(nn.Module):
    """Frozen CLIP text tower (eval mode, no grad) that turns prompts into ``TextCond``."""

    def __init__(self, config: TextTowerConfig = TextTowerConfig(), tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer or CLIPTokenizer.bundled(config.context_length)
        if max(self.tokenizer.vocab.values()) >= config.vocab_size or self.tokenizer.context_length != config.context_length:
            raise ConfigError("the tokenizer does not fit the text tower (vocabulary or context length); use the tower's tokenizer")
        norm = partial(LayerNorm, eps=config.eps)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        # (mlp_width + 0.5) / width: open_clip builds int(width * ratio) hidden units, exactly mlp_width
        self.transformer = Transformer(config.width, config.layers, config.heads, (config.mlp_width + 0.5) / config.width,
                                       act_layer=ACTIVATIONS[config.activation], norm_layer=norm)
        self.ln_final = norm(config.width)
        causal = torch.full((config.context_length,) * 2, float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)  # additive: -inf above the diagonal
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.requires_grad_(False).eval()

    def context_layer(self, clip_skip: int) -> int:
        """1-based layer whose output is the context: L - s + 1, with s = 0 read as 1."""
        layers = self.config.layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= layers:
            raise ConfigError(f"clip_skip must be an integer in 0..{layers} (got {clip_skip!r}); 0 or 1 = last layer, 2 = penultimate")
        return layers - max(clip_skip, 1) + 1

    def forward(self, ids: Tensor, clip_skip: int = 1) -> tuple[Tensor, Tensor]:
        """ids [B, T] → (context h_{L-s+1} [B, T, D], pooled LN_final(h_L)[first EOT] [B, D])."""
        layer = self.context_layer(clip_skip)
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        mask = self.causal_mask[:length, :length]
        for index, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x, attn_mask=mask)
            if index == layer:
                context = x
        eot = (ids == self.config.eot_token_id).int().argmax(dim=1)
        pooled = self.ln_final(x[torch.arange(len(ids), device=ids.device), eot])
        return context, pooled

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], clip_skip: int = 1) -> TextCond:
        """Tokenize and encode prompts on the module's device and dtype."""
        ids, mask = self.tokenizer(prompts)
        device = self.positional_embedding.device
        context, pooled = self(ids.to(device), clip_skip)
        return TextCond(context, pooled, mask.to(device))

    @classmethod
    def from_hf(cls, folder: str | Path, tokenizer: CLIPTokenizer | str | Path | None = None) -> "CLIPTextConditioner":
        """Load a transformers CLIPTextModel / CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise WeightsNotFoundError(f"{folder / 'config.json'} not found: pass a HF text_encoder folder")
        weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
        if weights is None:
            raise WeightsNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}: pass a HF text_encoder folder")
        config = TextTowerConfig.from_hf(json.loads((folder / "config.json").read_text()))
        return cls._built(config, tokenizer, hf_to_open_clip(read_state_dict(weights)))

    @classmethod
    def from_open_clip(cls, path: str | Path, config: TextTowerConfig | str | None = None,
                       tokenizer: CLIPTokenizer | str | Path | None = None) -> "CLIPTextConditioner":
        """Load the text tower of an open_clip / OpenAI CLIP state dict (visual keys and projection ignored).

        ``config``: a TextTowerConfig, an open_clip model name, or None to infer it from the shapes.
        """
        state = open_clip_text_state(read_state_dict(path))
        if isinstance(config, str):
            config = TextTowerConfig.from_open_clip_model(config)
        elif config is None:
            config = TextTowerConfig.from_open_clip_state(state)
        return cls._built(config, tokenizer, state)

    @classmethod
    def _built(cls, config: TextTowerConfig, tokenizer, state: Mapping[str, Tensor]) -> "CLIPTextConditioner":
        """The tower with ``state`` as its weights, strictly checked; built without random initialisation."""
        tokenizer = _as_tokenizer(tokenizer, config)
        return build_strict(lambda: cls(config, tokenizer), state, what="CLIP text encoder")

    @classmethod
    def load(cls, weights: str | Path | None = None, config: TextTowerConfig | None = None,
             tokenizer: str | Path | None = None) -> "CLIPTextConditioner":
        """Hydra entry point: random weights (``weights=None``), a HF folder, or an open_clip checkpoint file.

        With a HF folder, ``config`` (if given) must equal the folder's config.
        """
        if weights is None:
            config = config or TextTowerConfig()
            return cls(config, _as_tokenizer(tokenizer, config))
        if not Path(weights).is_dir():
            return cls.from_open_clip(weights, config, tokenizer)
        model = cls.from_hf(weights, tokenizer)
        if config is not None and config != model.config:
            raise ConfigError(f"text encoder config in {weights} ({model.config}) differs from the requested one; drop or fix the config")
        return model


def _as_tokenizer(tokenizer: CLIPTokenizer | str | Path | None, config: TextTowerConfig) -> CLIPTokenizer | None:
    """A tokenizer instance, a HF tokenizer folder, or None for the bundled vocabulary."""
    if tokenizer is None or isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    return CLIPTokenizer.from_hf(tokenizer, config.context_length)


def open_clip_text_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower entries of an open_clip checkpoint (``state_dict`` wrapper and ``module.`` prefix removed)."""
    state = state.get("state_dict", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key: value for key, value in state.items() if key.startswith(OPEN_CLIP_TEXT_KEYS)}


def hf_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIP text keys → open_clip text-tower keys, with in_proj = cat(q_proj, k_proj, v_proj).

    Text keys are ``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``, prefixed with ``text_model.`` in
    transformers 4 files and in CLIPModel. Everything else (vision tower, projections, logit_scale, position_ids)
    is dropped; unknown text keys and incomplete q/k/v triples keep their names so that strict loading reports them.
    """
    out, qkv = {}, {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if not key.startswith(HF_TEXT_KEYS) or key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key.startswith("encoder.layers."):
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            prefix = f"transformer.resblocks.{index}."
            if projection := HF_QKV.fullmatch(rest):
                qkv.setdefault((prefix, projection[2]), {})[projection[1]] = value
                continue
            hf_name = next((name for name in HF_LAYER_NAMES if rest.startswith(name)), None)
            out[prefix + (HF_LAYER_NAMES[hf_name] + rest.removeprefix(hf_name) if hf_name else rest)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if parts.keys() == {"q", "k", "v"}:
            out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            out.update({f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return out
