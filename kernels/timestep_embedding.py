"""Sinusoidal timestep features ``[cos(t f_i), sin(t f_i)]``, ``f_i = 10000^(-i / 128)``.

The head's time MLP then runs once per *distinct* timestep (at most 1,000) rather than once per
row: :func:`timestep_table` returns the features of the distinct steps and each row's index into
them; :mod:`adaln_condition` gathers the embedded rows. No gradient flows to integer timesteps.
"""
from __future__ import annotations

import math

import torch

from .utils import cdiv, empty, tl, triton

if triton is not None:

    @triton.jit
    def _timestep_features_kernel(T, OUT, n, HALF: tl.constexpr, neg_log_period,
                                  ROWS: tl.constexpr):
        i = tl.arange(0, HALF)
        freqs = tl.exp(neg_log_period * i.to(tl.float32) / HALF)
        for j in range(ROWS):
            r = tl.program_id(0) * ROWS + j
            if r < n:
                arg = tl.load(T + r).to(tl.float32) * freqs
                tl.store(OUT + r * (2 * HALF) + i, tl.cos(arg))
                tl.store(OUT + r * (2 * HALF) + HALF + i, tl.sin(arg))


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """(n, dim) fp32 sinusoidal features of integer timesteps ``t`` (n,)."""
    if dim % 2 or (dim // 2) & (dim // 2 - 1):
        raise ValueError(f"timestep feature size must be twice a power of two, got {dim}")
    n = t.shape[0]
    out = empty((n, dim), t.device, torch.float32)
    rows = 8
    _timestep_features_kernel[(cdiv(n, rows),)](t.contiguous(), out, n, HALF=dim // 2,
                                                       neg_log_period=-math.log(max_period),
                                                       ROWS=rows)
    return out


def timestep_table(t: torch.Tensor, num_timesteps: int = 1000):
    """(distinct timesteps, index of each row into them).

    With at least twice as many rows as timesteps nearly every step occurs, and taking all of
    them avoids ``unique``'s sort and host sync; otherwise the distinct steps are found."""
    if t.numel() >= 2 * num_timesteps:
        return torch.arange(num_timesteps, device=t.device), t
    steps, inverse = torch.unique(t, return_inverse=True)
    return steps, inverse
