"""Shared helpers for the trainer tests: tiny configs and a saved random teacher."""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from gendd_fast import DiffLoss
from gendd_fast import checkpoint as ckpt_io
from gendd_fast.config import make_config
from gendd_fast.models import create_model

TEACHER = "resnet8"   # 64-wide feature: two tokens of 32
STUDENT = "resnet8"


def save_teacher(folder, num_classes=4, arch=TEACHER, seed=0, prefix="", classifier="fc"):
    """A randomly initialised teacher saved as {'model': state_dict}, as published teachers are."""
    torch.manual_seed(seed)
    m = create_model(arch, num_classes)
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("fc."):
            k = classifier + k[2:]
        sd[prefix + k] = v
    path = os.path.join(str(folder), f"teacher_{arch}.pt")
    torch.save({"model": sd}, path)
    return path, m


def tiny_config(tmp_path, method="gendd", teacher_ckpt=None, **over):
    """A run of a few steps on 16x16 synthetic images, small enough for CI."""
    base = dict(method=method, dataset="synthetic", synthetic_size=64, num_classes=4,
                image_size=16, batch_size=16, epochs=2, lr=2e-3, warmup_epochs=0, workers=0,
                student=STUDENT, output=os.path.join(str(tmp_path), "run"), log_interval=1,
                plot=False, progress=False, token_dim=32, diffloss_w=48, diffloss_d=2, mul=3,
                sampling_steps="4", device="cpu", seed=0)
    if method != "ce":
        base.update(teacher=TEACHER, teacher_checkpoint=teacher_ckpt)
    base.update(over)
    return make_config(**base)


def read_metrics(folder, kind="train"):
    with open(os.path.join(folder, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


def perturb_zero_init(module, std=0.05, seed=1234):
    """Re-draw every parameter that is all zeros (adaLN, final layer): zeros would hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * std)
    return module


# Used by the tests of more than one module (checkpoint, data, trainer, kernels, head, ...).


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


# -- 4. SIGTERM to the whole process group with DataLoader workers ------------------------------
def _image_folder(root, n=8, classes=("a", "b"), size=20):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return str(root)


def _folder_cmd(data, out, *extra):
    return [sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset",
            "imagefolder", "--data-path", data, "--image-size", "16", "--batch-size", "4",
            "--student", "resnet8", "--device", "cpu", "--log-interval", "1", "--no-plot",
            "--no-progress", "--output", out, *extra]


# -- 8. disk full ---------------------------------------------------------------------------------
def _disk_full(monkeypatch, folder):
    """Point atomic_save's temporary file at /dev/full: every write fails with ENOSPC from the
    kernel, as on a full disk."""
    real = ckpt_io.tempfile.mkstemp

    def mkstemp(dir=None, prefix=None, suffix=None):
        fd, tmp = real(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", mkstemp)


def rel_close(got, want, tol, name=""):
    """Elementwise |got - want| <= tol * |want| (+ a floor far below any value compared)."""
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got - want).abs() / (want.abs() + 1e-30)
    worst = err.max().item()
    assert worst <= tol, f"{name}: relative error {worst:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# LayerNorm inside the kernels: eps and the rsqrt form, on rows of tiny variance
# ---------------------------------------------------------------------------------------------
def tiny_variance_rows(n, W, gen):
    """Row variances from 0 to 1e-4 (eps is 1e-6): where 1/(sqrt(var)+eps), another eps or a
    biased mean all give different numbers from rsqrt(var + eps)."""
    spread = torch.tensor([0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    spread = spread[torch.arange(n) % len(spread)]
    off = torch.randn(n, 1, generator=gen) * 0.5
    return off + spread[:, None] * torch.randn(n, W, generator=gen)


HEAD_LN_EPS = 1e-6  # the method's in_ln / norm_final eps, written out: not read from the code


def block_by_hand(h, shift, scale, gate, ln_w, ln_b, w0, b0, w2, b2):
    F = torch.nn.functional
    u = F.layer_norm(h, (h.shape[1],), ln_w, ln_b, HEAD_LN_EPS) * (1 + scale) + shift
    return h + gate * F.linear(F.silu(F.linear(u, w0, b0)), w2, b2)


def final_by_hand(h, shift, scale, w, b):
    F = torch.nn.functional
    return F.linear(F.layer_norm(h, (h.shape[1],), None, None, HEAD_LN_EPS) * (1 + scale)
                    + shift, w, b)


def _small_gendd(**kw):
    from gendd_fast.distill import GenDD
    from gendd_fast.models import create_model
    from helpers import perturb_zero_init
    torch.manual_seed(0)
    args = dict(token_dim=16, width=32, depth=1, sampling_steps="3", mul=2, cond_drop=0.3,
                beta=1.0, smooth=0.7)
    args.update(kw)
    g = GenDD(create_model("resnet8", 5), nn.Linear(64, 5), DiffLoss, **args)
    perturb_zero_init(g.diffloss, std=0.2)
    return g


def run_two_gloo_ranks(script, timeout=120):
    """Run ``script`` as ranks 0 and 1 of a 2-process gloo group on this machine (a free
    loopback port, one thread each, this checkout first on the path); fails on a rank's
    non-zero exit, showing its stderr."""
    import socket
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=root, stderr=subprocess.PIPE,
                              text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e[-2000:]
