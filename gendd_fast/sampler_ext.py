"""The native sampler loop (``gendd_fast._C``): loading, fallback, and the Python-side call.

``gendd_fast._C`` is normally built by ``setup.py``. If it was not, it is compiled on first use
with ``torch.utils.cpp_extension.load`` (ninja); if that is impossible too, :func:`available`
says False, the pure-PyTorch sampler runs, and one notice says why. Importing this module never
compiles anything.
"""
from __future__ import annotations

import os
import threading
from typing import List, Optional

import torch

from .head_layout import head_tensors, modulation_layers
from .layout import folder
from .notice import notice

_CSRC = folder("csrc")
_lock = threading.Lock()
_state = {"module": None, "tried": False, "why": None}


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load
    cpp = [os.path.join(_CSRC, "sampler.cpp")]
    cuda = torch.cuda.is_available() and CUDA_HOME is not None and torch.version.cuda
    sources = cpp + ([os.path.join(_CSRC, "sampler_cuda.cu")] if cuda else [])
    return load(name="gendd_fast_C" + ("_cuda" if cuda else "_cpu"), sources=sources,
                extra_cflags=["-O3", "-std=c++17"] + (["-DWITH_CUDA"] if cuda else []),
                extra_cuda_cflags=["-O3", "--use_fast_math", "-DWITH_CUDA"],
                extra_include_paths=[_CSRC], verbose=False)


def load_extension():
    """The compiled module, or None (with one notice) when it cannot be had."""
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        if os.environ.get("GENDD_FAST_NO_EXT") == "1":
            _state["why"] = "disabled by GENDD_FAST_NO_EXT=1"
            return None
        try:
            from . import _C  # built by setup.py
            _state["module"] = _C
        except ImportError:
            try:
                _state["module"] = _jit_build()
            except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers...
                _state["why"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                notice(f"sampler extension unavailable ({_state['why']}); using the PyTorch "
                        f"sampler")
        return _state["module"]


def available() -> bool:
    return load_extension() is not None


def head_weights(net) -> List[torch.Tensor]:
    """The head's tensors in the order ``_C.sample_loop`` unpacks them (head_layout.head_tensor_names)."""
    return head_tensors(net)


def stacked_modulation(net):
    """Every adaLN modulation weight stacked for one GEMM, ``(W, 11W)`` and ``(11W,)`` at depth
    3, with the ``+1`` of ``1 + scale`` folded into the scale segments of the bias. Cached on the
    head until any of those weights changes (an optimizer step bumps their version)."""
    layers = modulation_layers(net)
    params = [t for m in layers for t in (m.weight, m.bias)]
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = net.__dict__.get("_gendd_stacked_modulation")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        w = torch.cat([m.weight for m in layers]).t().contiguous()
        b = torch.cat([m.bias for m in layers]).clone()
        width = net.model_channels
        for i in range(len(layers)):
            b[3 * width * i + width: 3 * width * i + 2 * width] += 1
    net.__dict__["_gendd_stacked_modulation"] = (key, (w, b))
    return w, b


_TABLE_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                  "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
                  "posterior_log_variance_clipped", "alphas_cumprod", "alphas_cumprod_prev")


def step_tables(diffusion) -> torch.Tensor:
    """(S, 8) float32 per-step scalars, cast from the float64 tables as the reference does."""
    cols = [torch.from_numpy(diffusion.np[c]) for c in _TABLE_COLUMNS]
    return torch.stack(cols, dim=1).float()


def sample(head, z, chunk_idx, x_T, step_noises, cfg=1.0, temperature=1.0, ddim=False, eta=0.0,
           weights: Optional[List[torch.Tensor]] = None, timesteps: Optional[torch.Tensor] = None,
           tables: Optional[torch.Tensor] = None, check_indices: bool = True, stacked=None):
    """Run the whole loop natively. ``z``/``chunk_idx`` are the conditional rows only; with CFG
    the unconditional rows (z = 0, same chunk indices) are implied."""
    mod = load_extension()
    if mod is None:
        raise RuntimeError(f"gendd_fast._C is unavailable: {_state['why']}")
    diffusion = head.gen_diffusion
    w = weights if weights is not None else head_weights(head.net)
    if timesteps is None:
        timesteps = torch.tensor(diffusion.timestep_map, dtype=torch.long, device=w[0].device)
    if tables is None:
        tables = step_tables(diffusion)
    if stacked is None and weights is None:
        stacked = stacked_modulation(head.net)
    stacked_w, stacked_b = stacked if stacked is not None else (None, None)
    return mod.sample_loop(w, len(head.net.res_blocks), z.to(w[0].dtype), chunk_idx, x_T.float(),
                           step_noises.float(), tables, timesteps, float(cfg), float(temperature),
                           bool(ddim), float(eta), check_indices, stacked_w, stacked_b)


class GraphedSampler:
    """Replays the whole loop as one CUDA graph for repeated calls of the same shape.

    Inputs are copied into static buffers and the output is cloned, so callers may reuse theirs.
    The head's weights are captured by address: build a new GraphedSampler after loading others.
    """

    def __init__(self, head, n_rows: int, cfg=1.0, temperature=1.0, ddim=False, eta=0.0):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedSampler needs CUDA")
        p = next(head.parameters())
        if not p.is_cuda:
            raise RuntimeError("GraphedSampler needs the head on a CUDA device")
        self.head, self.kw = head, dict(cfg=cfg, temperature=temperature, ddim=ddim, eta=eta)
        d, zc = head.in_channels, head.z_channels
        steps = head.gen_diffusion.num_timesteps
        dev = p.device
        self.weights = head_weights(head.net)
        self.z = torch.zeros(n_rows, zc, device=dev, dtype=p.dtype)
        self.k = torch.zeros(n_rows, dtype=torch.long, device=dev)
        self.x_T = torch.zeros(n_rows, d, device=dev)
        self.noises = torch.zeros(steps, n_rows, d, device=dev)
        # Everything the loop reads from the host is made before capture (no copies inside it).
        self.kw.update(weights=self.weights, check_indices=False, stacked=stacked_modulation(
            head.net), tables=step_tables(
            head.gen_diffusion), timesteps=torch.tensor(head.gen_diffusion.timestep_map,
                                                        dtype=torch.long, device=dev))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, cuBLAS handles)
            sample(head, self.z, self.k, self.x_T, self.noises, **self.kw)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = sample(head, self.z, self.k, self.x_T, self.noises, **self.kw)

    def __call__(self, z, chunk_idx, x_T, step_noises):
        self.head.check_inputs(z, chunk_idx)  # the captured loop skips its own range checks
        self.z.copy_(z)
        self.k.copy_(chunk_idx)
        self.x_T.copy_(x_T)
        self.noises.copy_(step_noises)
        self.graph.replay()
        return self.out.clone()
