"""When the Triton path runs, and the small facts every kernel file needs about its inputs.

Triton kernels run on CUDA tensors (compiled) or, when TRITON_INTERPRET=1 was set before triton was
imported, on CPU tensors through Triton's interpreter (how the tests check them without a GPU). Anything
else takes the plain-torch reference path, so a CPU-only try-out never needs Triton to work.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "reference")


@triton.jit
def _interpreter_probe():
    pass


def interpreting() -> bool:
    """True when triton.jit built interpreted kernels (TRITON_INTERPRET=1 was set before import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older Triton releases
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(_interpreter_probe, InterpretedFunction)


INTERPRETING = interpreting()


def triton_runs_on(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels can run on these tensors' device(s)."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    return INTERPRETING and devices <= {"cpu", "cuda"}


def choose_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Resolve 'auto' to 'triton' where it can run, else 'reference'; refuse an impossible 'triton'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    runnable = triton_runs_on(*tensors)
    if backend == "auto":
        return "triton" if runnable else "reference"
    if backend == "triton" and not runnable:
        raise RuntimeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
    return backend


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` would run in here: autocast's when it is on, else x's own."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(x: torch.Tensor):
    """Kernels pick their dtypes explicitly; autocast must not re-cast the torch ops between them."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls stay IEEE (torch's default); half types use tensor cores with fp32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_device(x: torch.Tensor):
    """Triton launches on torch.cuda.current_device(), not on the tensor's: make them the same, so a model on
    cuda:N (or a rank whose LOCAL_RANK was never made current) never launches onto another GPU's memory."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (sizes persistent grids); a fixed 4 under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


__all__ = ["BACKENDS", "INTERPRETING", "autocast_off", "choose_backend", "compute_dtype", "dot_precision",
           "interpreting", "next_power_of_2", "on_device", "sm_count", "tl", "triton", "triton_runs_on"]
