"""Strict state-dict loading with an error that names the first offending keys and shapes."""

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from latentup.errors import WeightsMismatchError


def _first(names, n=3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def mismatch_report(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor]) -> str | None:
    """Describe how ``given`` differs from the expected key -> shape map, or None when it fits."""
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    shapes = [
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k])}"
        for k in sorted(expected.keys() & given.keys())
        if tuple(given[k].shape) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {len(shapes)}: {'; '.join(shapes[:3])}")
    return "; ".join(parts) or None


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±inf: min and max finite (both propagate NaN); one read of the tensor, no mask allocated."""
    return tensor.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def _check(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str):
    """Every persistent entry of ``module`` in ``state_dict`` with its shape, nothing more, every value finite."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    report = mismatch_report(expected, state_dict)
    if report:
        raise WeightsMismatchError(
            f"{what} weights do not fit the {what} config ({report}); check that the weights and config belong together"
        )
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not is_finite(v)]
    if broken:
        raise WeightsMismatchError(f"{what} weights hold NaN or infinite values in {len(broken)} tensors "
                                   f"({_first(broken)}): the file is damaged; download or export it again")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Load ``state_dict`` into ``module`` (persistent entries only), all keys and shapes checked first, and every
    value finite (NaN or infinite weights would only give black images)."""
    _check(module, state_dict, what)
    module.load_state_dict(dict(state_dict), strict=True)
    return module


class _ParametersLeftUninitialised(TorchFunctionMode):
    """In-place writes to an ``nn.Parameter`` (the ``nn.init`` fills of ``reset_parameters``) do nothing; in-place
    calls that write no values (``requires_grad_(False)`` of a frozen module) still run."""

    KEPT = frozenset({"requires_grad_", "share_memory_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if (name.endswith("_") and not name.startswith("_") and name not in self.KEPT
                and isinstance(target, nn.Parameter)):
            return target
        return func(*args, **kwargs)


def expected_shapes(make: Callable[[], nn.Module]) -> dict[str, torch.Size]:
    """Key -> shape of the persistent entries of ``make()``, built on the meta device: nothing allocated, nothing
    initialised (a config with absurd sizes costs nothing here)."""
    with torch.device("meta"), _ParametersLeftUninitialised():
        return {k: v.shape for k, v in make().state_dict().items()}


def build_strict(make: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], what: str = "model",
                 dtype: torch.dtype | None = None) -> nn.Module:
    """``make()`` with ``state_dict`` as its persistent entries, checked as :func:`load_strict` checks them.

    Faster than ``load_strict(make(), ...)`` and with the same result: the parameters are allocated but not
    initialised (the state dict replaces them), and the given tensors become the parameters and buffers
    themselves (``assign=True``), converted once to the module's dtype, or to ``dtype`` for floating entries.
    Buffers outside the state dict (non-persistent ones) are computed by ``make()`` as usual.
    """
    with _ParametersLeftUninitialised():
        module = make()
    _check(module, state_dict, what)
    own = module.state_dict()
    module.load_state_dict({k: _as_loaded(v, own[k], dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return module


def _as_loaded(value: torch.Tensor, own: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``value`` as copying it into ``own`` and then ``.to(dtype)`` leaves it, in one conversion where the first
    is exact (float16 or bfloat16 into float32), else in both."""
    final = dtype if dtype is not None and own.is_floating_point() else own.dtype
    exact = value.is_floating_point() and torch.promote_types(value.dtype, own.dtype) == own.dtype
    return (value if exact else value.to(own.dtype)).to(final).contiguous()
