"""A denoising model replayed from a CUDA graph: the sampler's U-Net call without per-kernel launch cost.

``graphed(model)`` wraps ``model(x, sigma) -> x0`` (a denoiser with guidance applied, as the samplers take it).
Every step of a sampling call has the same shapes, so on CUDA the first call runs the model eagerly on a side
stream (the warm-up: cuDNN / cuBLAS pick their kernels and workspaces, and its result is the step's result),
the second records the model into one ``torch.cuda.CUDAGraph`` over static input buffers, and every later call

    static_x ← x,  static_sigma ← sigma,  replay,  return a copy of static_out

is a handful of device copies and one graph launch: no Python, no allocator and no kernel launches per layer, and
no host-device synchronisation (sigma stays on the device). No compiler is involved, so there is no compile wait.
A new shape, dtype or device recaptures. Anything else (CPU, gradients enabled, a capture that fails) runs the
model eagerly, with the same results.
"""

import warnings

import torch
from torch import Tensor


class GraphedModel:
    """``model(x, sigma)`` with CUDA-graph replay for static shapes; eager elsewhere (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self.key = None  # (shape, dtype, device) of the current graph's inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, Tensor, Tensor] | None = None  # x, sigma, out
        self.failed = False
        self.warmed = None  # key of the last eager warm-up

    def applies(self, x: Tensor, sigma: Tensor) -> bool:
        return (not self.failed and x.is_cuda and torch.is_tensor(sigma) and sigma.device == x.device
                and not torch.is_grad_enabled() and torch.cuda.is_current_stream_capturing() is False)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if not self.applies(x, sigma):
            return self.model(x, sigma)
        key = (tuple(x.shape), x.dtype, x.device, tuple(sigma.shape))
        if key == self.key:
            static_x, static_sigma, static_out = self.static
            static_x.copy_(x)
            static_sigma.copy_(sigma)
            self.graph.replay()
            return static_out.clone()
        if key != self.warmed:  # first call at this shape: warm up on a side stream, keep its result
            self.warmed = key
            stream = torch.cuda.Stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                out = self.model(x, sigma)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            return out
        return self._capture(key, x, sigma)

    def _capture(self, key, x: Tensor, sigma: Tensor) -> Tensor:
        self.graph = self.static = self.key = None
        static_x, static_sigma = x.clone(), sigma.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.model(static_x, static_sigma)
        except RuntimeError as error:  # an operation that cannot be captured: stay eager for good
            warnings.warn(f"CUDA graph capture failed, running eagerly: {error}"[:500], stacklevel=3)
            self.failed = True
            return self.model(x, sigma)
        self.graph, self.static, self.key = graph, (static_x, static_sigma, static_out), key
        graph.replay()
        return static_out.clone()


def graphed(model) -> GraphedModel:
    """``model(x, sigma) -> x0`` replayed from a CUDA graph where it applies (CUDA, no gradients, static shapes)."""
    return model if isinstance(model, GraphedModel) else GraphedModel(model)
