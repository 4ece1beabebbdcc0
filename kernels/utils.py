"""Helpers shared by the kernels: where Triton can run, dtypes, launch sizes."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a machine without Triton still imports gendd_fast
    triton = None
    tl = None
    HAS_TRITON = False


@functools.lru_cache(maxsize=None)
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (tests); it must be set before import,
    so the environment is read once per process (not once per launch)."""
    return _env_flag("TRITON_INTERPRET")


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if not HAS_TRITON:
        return "Triton is not installed"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"Triton kernels need a CUDA device (got {device.type}; TRITON_INTERPRET=1 runs them "
            f"on CPU through the interpreter, slowly)")


def poisoning() -> bool:
    """GENDD_FAST_POISON=1 (tests): kernel outputs start as NaN, so an element a kernel fails
    to write shows up instead of passing as leftover memory. Read once per process."""
    return _env_flag("GENDD_FAST_POISON")


def empty(shape, device, dtype) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    if poisoning():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return empty(t.shape, t.device, dtype or t.dtype)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a jit function: calling it from Python
    goes through the JIT's call path, some microseconds a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_block(n_rows: int) -> int:
    """Rows handled per program by the row-wise kernels."""
    return 4 if interpreting() else 16
