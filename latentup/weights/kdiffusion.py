"""Import the original k-diffusion upscaler checkpoint (``image_v1`` inside the notebook's wrapper; SPEC §4.7).

Layout: ``inner_model.`` + ``proj_in|proj_out|timestep_embed|mapping_cond|mapping.{0,2}`` and
``u_net.{d,u}_blocks.<level>.<module>.*``, where each level is a flat sequence of modules (resample kernel,
then per layer: ResConvBlock, SelfAttention2d?, CrossAttention2d?). ``u_blocks`` are deepest-first, like diffusers'
``up_blocks``. Fused projections are split (qkv → q, k, v; kv → k, v), 1×1 convs become Linear weights, the
resampling kernels are dropped, and the wrapper's ``low_res_noise_embed.weight`` [n, 1] is returned separately.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from latentup.errors import WeightsMismatchError
from latentup.nn.unet import UNet, UNetConfig
from latentup.weights.files import read_state_dict
from latentup.weights.strict import expected_shapes, mismatch_report

NOISE_EMBED_KEY = "low_res_noise_embed.weight"
StateDict = dict[str, torch.Tensor]
KDIFFUSION_HEAD_DIM = 64  # image_v1 hard-codes head_size=64; it is not visible in the weights

_TOP = {"proj_in.": "conv_in.", "proj_out.": "conv_out.", "mapping_cond.": "time_embedding.cond_proj.",
        "mapping.0.": "time_embedding.linear_1.", "mapping.2.": "time_embedding.linear_2."}
_RESNET = {"main.0.mapper.": "norm1.linear.", "main.2.": "conv1.", "main.4.mapper.": "norm2.linear.",
           "main.6.": "conv2.", "skip.": "conv_shortcut."}
_BLOCK_KEY = re.compile(r"u_net\.([du])_blocks\.(\d+)\.(\d+)\.(.+)")


def _squeeze(w: torch.Tensor) -> torch.Tensor:
    """1×1 conv weight [O, I, 1, 1] → Linear weight [O, I] (biases pass unchanged)."""
    return w.flatten(1) if w.ndim == 4 else w


def _split(prefix: str, names: tuple[str, ...], fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chunk a fused projection on its output axis into ``prefix.<name>.{weight,bias}`` (copies, no shared storage)."""
    out = {}
    for kind, tensor in fused.items():
        for name, part in zip(names, _squeeze(tensor).chunk(len(names), dim=0)):
            out[f"{prefix}.{name}.{kind}"] = part.clone()
    return out


def _module(prefix: str, params: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Classify one k-diffusion module and rename its tensors: ('resnet' | 'self' | 'cross' | 'resample', dict)."""
    if set(params) == {"kernel"}:
        return "resample", {}
    if "main.0.mapper.weight" in params:
        renamed = {}
        for name, tensor in params.items():
            old = next((o for o in _RESNET if name.startswith(o)), None)
            if old is None:
                raise WeightsMismatchError(f"unknown k-diffusion resnet tensor {prefix}.{name}; "
                                           "is this an image_v1 upscaler checkpoint?")
            renamed[_RESNET[old] + name[len(old):]] = tensor
        return "resnet", renamed
    pick = lambda stem: {k.split(".")[-1]: v for k, v in params.items() if k.startswith(stem + ".")}  # noqa: E731
    if "qkv_proj.weight" in params:
        out = {f"norm1.linear.{k}": v for k, v in pick("norm_in.mapper").items()}
        out |= _split("attn1", ("to_q", "to_k", "to_v"), pick("qkv_proj"))
        out |= {f"attn1.to_out.0.{k}": _squeeze(v) for k, v in pick("out_proj").items()}
        return "self", out
    if "kv_proj.weight" in params:
        out = {f"norm2.linear.{k}": v for k, v in pick("norm_dec.mapper").items()}
        out |= {f"attn2.norm_cross.{k}": v for k, v in pick("norm_enc").items()}
        out |= {f"attn2.to_q.{k}": _squeeze(v) for k, v in pick("q_proj").items()}
        out |= _split("attn2", ("to_k", "to_v"), pick("kv_proj"))
        out |= {f"attn2.to_out.0.{k}": _squeeze(v) for k, v in pick("out_proj").items()}
        return "cross", out
    raise WeightsMismatchError(f"unknown k-diffusion module {prefix} ({', '.join(sorted(params)[:3])}); "
                               "is this an image_v1 upscaler checkpoint?")


def kdiffusion_to_latentup(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, torch.Tensor | None]:
    """k-diffusion upscaler state dict (with or without ``inner_model.``) → (U-Net dict in diffusers keys,
    low-res noise Fourier weight [n, 1] or None)."""
    noise_weight = state_dict.get(NOISE_EMBED_KEY)
    prefix = "inner_model." if any(k.startswith("inner_model.") for k in state_dict) else ""
    inner = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k != NOISE_EMBED_KEY}
    out, blocks = {}, {}
    for key, tensor in inner.items():
        if key == "timestep_embed.weight":
            out["time_proj.weight"] = tensor.squeeze(-1)
        elif match := _BLOCK_KEY.fullmatch(key):
            side, block, index, name = match.groups()
            blocks.setdefault((side, int(block)), {}).setdefault(int(index), {})[name] = tensor
        elif old := next((o for o in _TOP if key.startswith(o)), None):
            out[_TOP[old] + key[len(old):]] = tensor
        else:
            raise WeightsMismatchError(f"unknown k-diffusion tensor {prefix}{key}; "
                                       "is this an image_v1 upscaler checkpoint?")
    for (side, block), modules in sorted(blocks.items()):
        stem, layer = f"{'down' if side == 'd' else 'up'}_blocks.{block}", -1
        for index in sorted(modules):
            kind, params = _module(f"{prefix}u_net.{side}_blocks.{block}.{index}", modules[index])
            if kind == "resnet":
                layer += 1
            group = "resnets" if kind == "resnet" else "attentions"
            out |= {f"{stem}.{group}.{layer}.{name}": tensor for name, tensor in params.items()}
    return out, noise_weight


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], head_dim: int = KDIFFUSION_HEAD_DIM) -> UNetConfig:
    """Infer the UNetConfig of a U-Net state dict in diffusers keys (e.g. the output of kdiffusion_to_latentup)."""
    try:
        n = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("down_blocks."))
        level_keys = [[k for k in state_dict if k.startswith(f"down_blocks.{i}.")] for i in range(n)]
        cross_dims = [v.shape[1] for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")]
        return UNetConfig(
            in_channels=state_dict["conv_in.weight"].shape[1], out_channels=state_dict["conv_out.weight"].shape[0],
            channels=tuple(state_dict[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)),
            depths=tuple(len({k.split(".")[3] for k in keys if ".resnets." in k}) for keys in level_keys),
            self_attn=tuple(any(".attn1." in k for k in keys) for keys in level_keys),
            cross_attn=tuple(any(".attn2." in k for k in keys) for keys in level_keys),
            cross_attention_dim=cross_dims[0] if cross_dims else None, head_dim=head_dim,
            mapping_dim=2 * state_dict["time_proj.weight"].numel(),
            mapping_cond_dim=state_dict["time_embedding.cond_proj.weight"].shape[1]
            if "time_embedding.cond_proj.weight" in state_dict else 0,
        )
    except (KeyError, ValueError) as error:
        raise WeightsMismatchError(f"cannot infer the U-Net config from these weights (missing {error}); "
                                   "is this a complete upscaler checkpoint?") from None


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    obj = read_state_dict(path)
    state = next((obj[k] for k in ("model_ema", "model") if k in obj), obj)
    if any(k.startswith("unet.") for k in state):
        raise WeightsMismatchError(f"{path} holds latentup tensors (unet.*) without latentup's metadata: save it with "
                                   "latentup.weights.single_file.save_upscaler or train.py stage=export")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} holds no state dict (looked for 'model_ema', 'model' or a bare dict "
                                   "of tensors); pass a k-diffusion checkpoint")
    return state


def load_kdiffusion_checkpoint(path) -> tuple[UNetConfig, StateDict, torch.Tensor | None]:
    """Read a k-diffusion upscaler checkpoint: (inferred config, U-Net state dict, noise Fourier weight or None).

    ``.pth``/``.ckpt`` load with ``weights_only=True`` and use ``model_ema`` (else ``model``, else the bare dict).
    The converted dict is checked against the inferred config, so a truncated file fails here, naming keys.
    """
    unet_state, noise_weight = kdiffusion_to_latentup(_read_state_dict(Path(path)))
    config = config_from_state_dict(unet_state)
    expected = expected_shapes(lambda: UNet(config))
    report = mismatch_report(expected, unet_state)
    if report:
        raise WeightsMismatchError(f"k-diffusion checkpoint {path} does not fit its inferred U-Net config ({report}); "
                                   "the file is incomplete or not an image_v1 upscaler")
    return config, unet_state, noise_weight
