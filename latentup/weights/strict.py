"""Strict state-dict loading with an error that names the first offending keys and shapes."""

from collections.abc import Mapping

import torch
from torch import nn

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


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> nn.Module:
    """Load ``state_dict`` into ``module`` (persistent entries only), all keys and shapes checked first, and every
    value finite (NaN or infinite weights would only give black images)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    report = mismatch_report(expected, state_dict)
    if report:
        raise WeightsMismatchError(
            f"{what} weights do not fit the {what} config ({report}); check that the weights and config belong together"
        )
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise WeightsMismatchError(f"{what} weights hold NaN or infinite values in {len(broken)} tensors "
                                   f"({_first(broken)}): the file is damaged; download or export it again")
    module.load_state_dict(dict(state_dict), strict=True)
    return module
