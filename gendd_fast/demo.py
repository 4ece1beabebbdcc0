"""The embedded default: a complete GenDD pipeline on data that ships inside a package.

scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), resized to 32x32 and split
80/20 (stratified, fixed seed). In order: a teacher trained with CE, a student trained from scratch
(CE), the same student with Hinton KD, then GenDD (stage 1: CE through the teacher's classifier;
stage 2: the diffusion head), evaluated by sampling and by its linear probe. Every stage is a
plain :func:`gendd_fast.train.train` call with a config you could also pass on the command line.

The head is scaled to the task (width 256, 10 copies per token): the paper's width-1024 head is
the default for CIFAR/ImageNet recipes, and this demo must finish in minutes on two CPU cores.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

from .config import make_config

TEACHER, STUDENT = "wrn_16_2", "resnet8"


def demo_configs(output: str, epochs: int = 12, sampling_steps: str = "64"):
    """(stages, settings common to all stages)."""
    common = dict(dataset="digits", batch_size=64, lr=2e-3, weight_decay=5e-4, opt="adamw",
                  betas=[0.9, 0.95], warmup_epochs=1, sched="cos", epochs=epochs, workers=0,
                  seed=0, log_interval=50, plot=True, progress=True, eval_every=epochs)
    teacher_ckpt = os.path.join(output, "teacher", "last.pt")
    pretrain_ckpt = os.path.join(output, "gendd-stage1", "last.pt")
    gendd = dict(token_dim=64, diffloss_w=256, diffloss_d=3, mul=10, cond_drop=0.2, beta=1.0,
                 smooth=0.9, sampling_steps=sampling_steps, cfg=2.0, head="auto")
    return [
        dict(name="teacher", row=f"teacher ({TEACHER}, CE)", method="ce", student=TEACHER),
        dict(name="scratch", row=f"student ({STUDENT}) from scratch", method="ce",
             student=STUDENT),
        dict(name="kd", row=f"student ({STUDENT}) + KD", method="kd", student=STUDENT,
             teacher=TEACHER, teacher_checkpoint=teacher_ckpt),
        dict(name="gendd-stage1", row=None, method="gendd-pretrain", student=STUDENT,
             teacher=TEACHER, teacher_checkpoint=teacher_ckpt, epochs=max(1, epochs // 4),
             eval_every=max(1, epochs // 4)),
        dict(name="gendd", row=f"student ({STUDENT}) + GenDD", method="gendd", student=STUDENT,
             teacher=TEACHER, teacher_checkpoint=teacher_ckpt, init=pretrain_ckpt, **gendd),
    ], common


def format_table(rows: List[Dict]) -> str:
    head = f"| {'model':<32} | {'top-1':>6} | {'top-5':>6} | {'GenDD sampling top-1':>20} |"
    sep = "|" + "-" * 34 + "|" + "-" * 8 + "|" + "-" * 8 + "|" + "-" * 22 + "|"
    lines = [head, sep]
    for r in rows:
        samp = f"{r['sample_top1']:.2f}" if r.get("sample_top1") is not None else "-"
        lines.append(f"| {r['row']:<32} | {r['top1']:>6.2f} | {r['top5']:>6.2f} | {samp:>20} |")
    return "\n".join(lines)


def run_demo(output: str = os.path.join("runs", "digits-demo"), epochs: int = 12,
             sampling_steps: str = "64", quiet: bool = False) -> Dict:
    from .train import notice, train
    stages, common = demo_configs(output, epochs, sampling_steps)
    t0 = time.time()
    rows = []
    for st in stages:
        st = dict(st)
        name, row = st.pop("name"), st.pop("row")
        cfg = make_config(**{**common, **st, "output": os.path.join(output, name),
                             "progress": not quiet, "overwrite": True})  # a rerun replaces it
        notice(f"--- {name}: python -m gendd_fast.train " + " ".join(
            f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
            for k, v in {**common, **st}.items() if k not in ("plot", "progress")))
        res = train(cfg)
        if row:
            rows.append(dict(row=row, top1=res["top1"], top5=res["top5"],
                             sample_top1=res.get("sample_top1")))
    table = format_table(rows)
    summary = {"rows": rows, "seconds": round(time.time() - t0, 1),
               "dataset": "scikit-learn digits at 32x32: 1438 train / 359 held-out images",
               "epochs": epochs}
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(output, "results.md"), "w") as fh:
        fh.write(table + "\n")
    print(f"\nGenDD on the embedded digits data (held-out split, {summary['seconds']:.0f}s in all):")
    print(table)
    print(f"GenDD linear probe is the 'top-1' column; 'sampling' classifies generated teacher "
          f"features with the teacher's classifier. Results: {output}/results.json")
    return summary
