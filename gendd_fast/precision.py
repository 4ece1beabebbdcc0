"""Mixed precision: what ``--amp`` resolves to on a device, and the autocast context for it.

Shared by the trainer and the evaluation so that both run a model in the same precision.
"""
from __future__ import annotations

import contextlib

import torch


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` becomes bf16 on a CUDA device that supports it, else off (fp32)."""
    if amp != "auto":
        return amp
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "off"


def autocast_for(device: torch.device, amp: str):
    """The autocast context for an --amp setting (already resolved, not 'auto')."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
