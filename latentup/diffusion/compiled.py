"""The U-Net under ``torch.compile``: a kernel cache that outlives the process, one graph across sizes, and the
compile time said out loud.

``compiled(network, mode)`` is ``torch.compile(network, mode=mode)`` behind :class:`ReportedCompile`, with

- the cache (:func:`compile_cache`): inductor's FX-graph, autotuning and kernel caches in a folder that outlives
  the process, so only the first process ever compiles the U-Net for a shape and dtype; later ones load the kernels;
- sizes: the first input shape compiles a static graph (the fastest kernels); the first call at another shape
  marks the input's height and width and the batch of every tensor argument dynamic
  (``torch._dynamo.maybe_mark_dynamic``) and compiles one graph with them symbolic, which then serves every later
  shape with no compile (``reduce-overhead`` still records a CUDA graph per shape: a recording of kernels, not a
  compilation). Without the marks dynamo would make only the
  dimensions that changed so far symbolic, and recompile when another one changes;
- the report: the first call at each input signature (shape, dtype) is timed, and a line on stderr says how long
  it took and whether it compiled a new graph, so a compile wait is never silent.
"""

import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from latentup.diffusion.graphed import tensors_of


def compile_cache() -> Path:
    """Inductor's cache folder made persistent: $TORCHINDUCTOR_CACHE_DIR when set, else
    $XDG_CACHE_HOME/latentup/inductor (~/.cache/latentup/inductor) instead of torch's default under /tmp."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(cache) / "latentup" / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (its statistics counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class ReportedCompile(nn.Module):
    """``network(x, ...)`` through its compiled form; the first call at each (shape, dtype) of ``x`` is timed and
    reported on stderr ("compiled" when dynamo made a new graph for it, else "reused"). ``network`` is a U-Net:
    ``condition`` passes through."""

    def __init__(self, network: nn.Module, mode: str):
        super().__init__()
        self.mode = mode
        self.compiled = torch.compile(network, mode=mode)  # holds ``network`` (one copy of the weights)
        self.seen: dict[tuple, float] = {}  # input signature -> seconds of its first call

    def condition(self, *args, **kwargs):
        """The U-Net's per-call conditioning, eager (it runs once per sampling call)."""
        return self.compiled.condition(*args, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        key = (tuple(x.shape), x.dtype)
        if key in self.seen:
            return self.compiled(x, *args, **kwargs)
        if self.seen:  # a second shape: one graph for every shape from now on
            for dim in (2, 3):
                torch._dynamo.maybe_mark_dynamic(x, dim)
            for tensor in tensors_of([x, args, kwargs]):  # the batch of x and of the conditioning
                if tensor.ndim:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if x.is_cuda:  # time the call itself, not a queue of earlier launches (first calls only)
            torch.cuda.synchronize(x.device)
        graphs, start = _graphs_compiled(), time.perf_counter()
        out = self.compiled(x, *args, **kwargs)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seen[key] = seconds = time.perf_counter() - start
        what = "compiled a new graph" if _graphs_compiled() > graphs else "reused the compiled graph"
        shape = "×".join(map(str, key[0]))
        print(f"torch.compile ({self.mode}): first U-Net call at {shape} {str(x.dtype).removeprefix('torch.')} "
              f"{what} in {seconds:.1f} s (kernel cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})",
              file=sys.stderr)
        return out


def compiled(network: nn.Module, mode: str) -> ReportedCompile:
    """``network`` compiled with ``torch.compile(mode=mode)``, its kernels cached across processes, one graph
    reused across sizes, first calls reported (module docstring)."""
    compile_cache()
    return ReportedCompile(network, mode)
