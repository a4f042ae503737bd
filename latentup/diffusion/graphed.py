"""A denoiser replayed from a CUDA graph: the sampler's U-Net call without per-kernel launch cost.

``GraphedDenoiser(D)`` wraps a denoiser ``D(x, sigma, **cond)`` that has ``prepare(**cond) -> cond`` (a
``KarrasDenoiser``; ``latentup.diffusion.guidance`` calls ``prepare`` once per sampling call and passes its result
to every step). Within one sampling call every step has the same shapes and the same conditioning tensors, so on
CUDA the first step runs D eagerly on a side stream (the warm-up: cuDNN / cuBLAS choose their kernels and
workspaces; its result is the step's result), the second records D into one ``torch.cuda.CUDAGraph`` over static
buffers for x and sigma (the prepared conditioning is captured in place), and every later step

    static_x ← x,  static_sigma ← sigma,  replay,  return a copy of static_out

is two device copies and one graph launch: no Python, no allocator and no kernel launch per layer, and no
host-device synchronisation (sigma stays on the device). No compiler is involved, so there is no compile wait. The
next sampling call's ``prepare`` copies its conditioning into the recorded buffers when every tensor has the same
shape, dtype and device, and replays the same graph from its first step (a folder of same-size images, a server);
otherwise, and for another shape of x, it records anew. Anything else (CPU, gradients enabled,
conditioning that is not the prepared one, a capture that fails) runs D eagerly, with the same results. The
per-call state is per thread, so concurrent sampling calls (one per thread, as a server makes them) each record and
replay a graph of their own.
"""

import dataclasses
import threading
import warnings

import torch
from torch import Tensor, nn


class GraphedDenoiser(nn.Module):
    """``denoiser(x, sigma, **cond)`` with CUDA-graph replay for static shapes; eager elsewhere (module docstring)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.enabled = True
        self._calls = threading.local()  # this thread's sampling call: see _call

    def _call(self):
        """This thread's state: prepared (the call's conditioning), key / warmed (the input signature of the
        recorded graph / of the last warm-up), graph, static (x, sigma, out buffers)."""
        call = self._calls
        if not hasattr(call, "prepared"):
            call.prepared = call.key = call.warmed = call.graph = call.static = None
        return call

    def prepare(self, **cond) -> dict:
        """The wrapped denoiser's per-call conditioning: copied into the recorded graph's buffers (and those
        returned) when it fits them, else it starts a new graph."""
        call, prepared = self._call(), self.denoiser.prepare(**cond)
        if call.graph is not None and _signature(prepared) == _signature(call.prepared):
            for buffer, value in zip(tensors_of(call.prepared), tensors_of(prepared)):
                buffer.copy_(value)
            return call.prepared
        call.key = call.warmed = call.graph = call.static = None
        call.prepared = prepared
        return prepared

    def _applies(self, x: Tensor, sigma: Tensor, cond: dict) -> bool:
        prepared = self._call().prepared
        return (self.enabled and x.is_cuda and torch.is_tensor(sigma) and sigma.device == x.device
                and not torch.is_grad_enabled() and prepared is not None and cond.keys() == prepared.keys()
                and all(cond[k] is prepared[k] for k in cond))

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        if not self._applies(x, sigma, cond):
            return self.denoiser(x, sigma, **cond)
        call, key = self._call(), (tuple(x.shape), x.dtype, x.device, tuple(sigma.shape), sigma.dtype)
        if key == call.key:
            static_x, static_sigma, static_out = call.static
            static_x.copy_(x)
            static_sigma.copy_(sigma)
            call.graph.replay()
            return static_out.clone()
        if key != call.warmed:  # first step at this signature: warm up on a side stream, keep its result
            call.warmed = key
            stream = torch.cuda.Stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                out = self.denoiser(x, sigma, **cond)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            return out
        return self._capture(call, key, x, sigma, cond)

    def _capture(self, call, key, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
        static_x, static_sigma, graph = x.clone(), sigma.clone(), torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.denoiser(static_x, static_sigma, **cond)
        except RuntimeError as error:  # an operation that cannot be recorded: stay eager
            warnings.warn(f"CUDA graph capture failed, running eagerly: {error}"[:500], stacklevel=3)
            self.enabled = False
            return self.denoiser(x, sigma, **cond)
        call.graph, call.static, call.key = graph, (static_x, static_sigma, static_out), key
        graph.replay()
        return static_out.clone()


def _signature(tree):
    """The structure of nested dicts / lists / tuples / dataclasses, with tensors as (shape, dtype, device)."""
    if torch.is_tensor(tree):
        return tuple(tree.shape), tree.dtype, tree.device
    if isinstance(tree, dict):
        return tuple((key, _signature(value)) for key, value in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree).__name__, tuple(_signature(value) for value in tree)
    if dataclasses.is_dataclass(tree):
        return type(tree).__name__, tuple(_signature(getattr(tree, f.name)) for f in dataclasses.fields(tree))
    return tree


def tensors_of(tree) -> list[Tensor]:
    """The tensors of nested dicts / lists / tuples / dataclasses, in the order of ``_signature``."""
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    elif dataclasses.is_dataclass(tree):
        tree = [getattr(tree, f.name) for f in dataclasses.fields(tree)]
    elif not isinstance(tree, (list, tuple)):
        return []
    return [tensor for value in tree for tensor in tensors_of(value)]

