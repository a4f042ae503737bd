"""Classifier-free guidance on the denoised prediction (SPEC §3.7):

    D = D_u + g (D_c - D_u),

evaluated as one batched call over [unconditional || conditional] (the unconditional half first, as diffusers).
Guidance is on exactly when g > 1 (:func:`uses_guidance`); at g <= 1 only the conditional half runs.
"""

import torch


def uses_guidance(scale: float) -> bool:
    """Whether a CFG scale runs the unconditional half: g > 1 (at g = 1 the formula is D_c)."""
    return scale > 1.0


def _stack(uncond: dict, cond: dict) -> dict:
    return {k: None if cond[k] is None else torch.cat([uncond[k], cond[k]]) for k in cond}


def guided(denoiser, cond: dict, scale: float = 1.0, uncond: dict | None = None, prepare=None):
    """``model(x, sigma) -> x0`` for a denoiser and conditioning dicts; CFG when :func:`uses_guidance` and uncond
    is given.

    ``prepare(**cond) -> cond`` (e.g. ``KarrasDenoiser.prepare``) turns the (stacked) conditioning into what every
    step reuses, once per call.
    """
    prepare = prepare or (lambda **c: c)
    if uncond is None or not uses_guidance(scale):
        cond = prepare(**cond)
        return lambda x, sigma: denoiser(x, sigma, **cond)
    both = prepare(**_stack(uncond, cond))

    def model(x, sigma):
        d_uncond, d_cond = denoiser(torch.cat([x, x]), sigma, **both).chunk(2)
        return d_uncond + scale * (d_cond - d_uncond)

    return model
