"""Shared helpers for the trainer tests: tiny configs and a saved random teacher."""
import json
import os

import torch

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
