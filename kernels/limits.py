"""Per-device launch limits the GEMM configurations must respect.

The shared memory a block may use (the opt-in maximum) differs threefold across the GPUs we
support, so a tile / stage choice that fits an H100 can fail to launch on an RTX 4090 with
``OutOfResources``. The launch code asks :func:`shared_memory_limit` for the device at hand;
:func:`simulate_arch` makes the same code choose as it would for another GPU, so a CPU-only
machine can record (and compile ahead of time) what each GPU would launch.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

# Shared memory per block, opt-in maximum, in bytes (CUDA programming guide, "Technical
# specifications per compute capability"); what torch reports as shared_memory_per_block_optin.
SHARED_MEMORY_OPTIN = {
    80: 166912,   # A100, A30
    86: 101376,   # RTX 30xx, A10, A40
    89: 101376,   # RTX 40xx, L4, L40
    90: 232448,   # H100, H200
    100: 232448,  # B200, GB200
    120: 101376,  # RTX 50xx
}
ARCH_NAMES = {80: "A100", 86: "RTX 30xx / A10", 89: "RTX 40xx / L4 / L40", 90: "H100 / H200",
              100: "B200", 120: "RTX 50xx"}
SUPPORTED_ARCHS = tuple(sorted(SHARED_MEMORY_OPTIN))

_simulated: Optional[int] = None  # the shared memory limit in force, bytes
_simulated_arch: Optional[int] = None  # the compute capability in force (e.g. 90)


@contextlib.contextmanager
def simulate_arch(arch: int, limit: Optional[int] = None):
    """Within the block, launch configurations are chosen as for compute capability ``arch``
    (e.g. 90), or for a device allowing ``limit`` bytes, whatever device the tensors are on."""
    global _simulated, _simulated_arch
    if limit is None and arch not in SHARED_MEMORY_OPTIN:
        raise ValueError(f"unknown arch sm_{arch}; known: {SUPPORTED_ARCHS}")
    old = (_simulated, _simulated_arch)
    _simulated = int(limit if limit is not None else SHARED_MEMORY_OPTIN[arch])
    _simulated_arch = int(arch)
    try:
        yield
    finally:
        _simulated, _simulated_arch = old


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def compute_capability(t: torch.Tensor) -> int:
    """The compute capability (e.g. 90) the launch on ``t``'s device compiles for, or the
    simulated one; 90 for the interpreter (no launch limits apply there)."""
    if _simulated_arch is not None:
        return _simulated_arch
    if t.is_cuda:
        return _cuda_arch(t.device.index if t.device.index is not None else
                          torch.cuda.current_device())
    return 90


@functools.lru_cache(maxsize=None)
def _cuda_limit(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one block may use on ``device`` (a device, or a tensor on it; or
    on the simulated arch)."""
    if _simulated is not None:
        return _simulated
    if isinstance(device, torch.Tensor):  # the launch path: no torch.device built per launch
        if not device.is_cuda:
            return SHARED_MEMORY_OPTIN[90]
        device = device.device
    if getattr(device, "type", None) == "cpu":  # the common interpreter case, without a parse
        return SHARED_MEMORY_OPTIN[90]
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_limit(device.index if device.index is not None else
                           torch.cuda.current_device())
    return SHARED_MEMORY_OPTIN[90]  # the interpreter: no limit applies; any table entry does
