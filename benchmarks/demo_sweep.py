"""Choosing the demo's settings on the validation split, and where a demo step's CPU time goes.

Sweep: variants of the demo's students (``gendd_fast.demo``) that each change one thing, trained
with ``--val-from-train 0.2`` (a stratified fifth of the training images is the evaluation set;
the test images are never seen), reusing a teacher trained on the remaining training images (the
teacher of ``python -m gendd_fast.demo --split val``). Every run records validation top-1 (GenDD:
sampling top-1 and linear probe) and its CPU time (``time.process_time``: all threads of this
process, so it does not grow when other jobs share the machine the way wall time does). Results
go to a JSON file after every run, so an interrupted sweep keeps what it measured.

    OMP_NUM_THREADS=1 python -m gendd_fast.demo --split val --output runs/digits-demo-val
    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py --teacher-dir runs/digits-demo-val/teacher \\
        --seeds 0 1 --out benchmarks/results/demo_val_sweep.json
    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py --profile    # CPU ms per step, by part

``--profile`` times the parts of one training step of each student (data, teacher forward,
student + loss forward, backward, optimiser) over two epochs, and one evaluation, at the old
demo's 32 px and width-256/mul-10 head and at the current settings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from gendd_fast import demo  # noqa: E402
from gendd_fast.config import make_config  # noqa: E402
from gendd_fast.train import Trainer, train  # noqa: E402

# name -> (demo stage, overrides of that stage, stage-1 overrides (GenDD only), epoch factor)
VARIANTS = {
    "scratch": ("scratch", {}, None, 1),
    "scratch x2 epochs": ("scratch", {}, None, 2),
    "kd": ("kd", {}, None, 1),
    "kd x2 epochs": ("kd", {}, None, 2),
    "dkd x2 epochs": ("dkd", {}, None, 2),
    "gendd": ("gendd", {}, {}, 1),
    "gendd stage1 lr 1e-2": ("gendd", {}, {"lr": 1e-2}, 1),
    "gendd stage1 lr 1e-2, x2 epochs": ("gendd", {}, {"lr": 1e-2}, 2),
    "gendd-free x2 epochs": ("gendd-free", {}, None, 2),
}


def timed(fields):
    c0, t0 = time.process_time(), time.time()
    res = train(make_config(**{k: v for k, v in fields.items() if k != "name"},
                            overwrite=True))
    return res, time.process_time() - c0, time.time() - t0


def profile_step(fields, epochs: int = 2):
    """CPU ms per step of each part of the trainer's step, and CPU s of one evaluation."""
    tr = Trainer(make_config(**{**{k: v for k, v in fields.items() if k != "name"},
                                "init": None, "overwrite": True}))
    tr.set_up()
    tr.resume()  # no checkpoint: records the teacher's identity (the teacher cache checks it)
    tr.prepare_loop()
    parts = dict(data=0.0, teacher=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    pt, n = time.process_time, 0
    tr.model.train()
    for ep in range(epochs):
        tr.loaders.train.set_epoch(ep, 0)
        it = iter(tr.loaders.train)
        while True:
            c = pt()
            try:
                x, y = next(it)
            except StopIteration:
                break
            parts["data"] += pt() - c
            c = pt()
            t_out = tr.teacher_forward(x) if tr.teacher_forward is not None else None
            parts["teacher"] += pt() - c
            c = pt()
            loss, _ = tr.model(x, y, t_out, 0.5)
            parts["forward"] += pt() - c
            c = pt()
            loss.backward()
            parts["backward"] += pt() - c
            c = pt()
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            parts["optimizer"] += pt() - c
            n += 1
    c = pt()
    tr._evaluate(tr.sample_final, tr.eval_kw)
    ms = {k: round(1000 * v / n, 1) for k, v in parts.items()}
    return dict(ms, total=round(sum(ms.values()), 1), steps=n, eval_s=round(pt() - c, 2))


PROFILES = {"old": ("old demo: 32 px, head width 256, mul 10", 32, {"mul": 10}),
            "now": ("16 px, head width 256, mul 4, teacher forward every step", 16, {}),
            "w128": ("16 px, head width 128, mul 4", 16, {"diffloss_w": 128}),
            "mul10": ("16 px, head width 256, mul 10", 16, {"mul": 10}),
            "cache": ("now: 16 px, head width 256, mul 4, --teacher-cache", 16, {})}


def run_profile(out_json: str, output: str, only=None):
    record = {"host": demo.environment(), "runs": []}
    settings = {label: (size, head) for key, (label, size, head) in PROFILES.items()
                if not only or key in only}
    for name, (size, head) in settings.items():
        folder = os.path.join(output, f"profile{size}")
        if not os.path.isfile(os.path.join(folder, "teacher", "last.pt")):
            t = demo.teacher_stage(folder, epochs=1, image_size=size)
            timed(t)  # a one-epoch teacher: its speed, not its accuracy, matters here
        cache = os.path.join(folder, "teacher-cache", "cache.pt") if "cache" in name else None
        stages = {s["name"]: s for s in demo.student_stages(folder, 0, image_size=size,
                                                            gendd=head, teacher_cache=cache)}
        if cache and not os.path.isfile(cache):  # built once, as the demo does, not per stage
            c = time.process_time()
            demo.run_logged(demo.teacher_cache_stage(stages["kd"], cache), None)
            record["teacher_cache_build_cpu_s"] = round(time.process_time() - c, 1)
        keys = ("scratch", "kd", "gendd") if "every step" in name or name.startswith(
            ("old", "now")) else ("gendd",)
        for key in keys:
            # a folder of its own per setting: a Trainer that is only set up keeps its run lock
            where = os.path.join(output, "profile-steps", f"{len(record['runs'])}-{key}")
            row = dict(setting=name, stage=key, **profile_step({**stages[key], "output": where}))
            record["runs"].append(row)
            print(json.dumps(row), flush=True)
    with open(out_json, "w") as fh:
        json.dump(record, fh, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=os.path.join("runs", "demo-sweep"))
    p.add_argument("--teacher-dir", default=os.path.join("runs", "digits-demo-val", "teacher"),
                   help="teacher of `python -m gendd_fast.demo --split val`")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "demo_val_sweep.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="*", help="variant names to run (default: all); with "
                   "--profile: settings among " + ", ".join(PROFILES))
    p.add_argument("--profile", action="store_true", help="time the parts of a step instead")
    args = p.parse_args(argv)
    if args.profile:
        return run_profile(args.out if "profile" in args.out else
                           os.path.join("benchmarks", "results", "demo_step_profile.json"),
                           args.output, args.only)
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    ckpt = os.path.join(args.teacher_dir, "last.pt")
    if not os.path.isfile(ckpt):
        p.error(f"no teacher at {ckpt}: run `python -m gendd_fast.demo --split val` first")
    record = {"setting": {"split": "val", "val_from_train": demo.VAL_FRACTION,
                          "epochs": demo.EPOCHS, "gendd_head": demo.GENDD_HEAD,
                          "teacher_dir": args.teacher_dir, "seeds": args.seeds},
              "host": demo.environment(), "runs": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=2)

    for seed in args.seeds:
        for name in names:
            key, over, s1_over, factor = VARIANTS[name]
            ep = demo.scaled(demo.EPOCHS, factor)
            stages = {s["name"]: s for s in demo.student_stages(
                args.output, seed, epochs=ep, split="val", teacher_checkpoint=ckpt)}
            tag = name.replace(" ", "_").replace(",", "")
            folder = os.path.join(args.output, f"seed{seed}", tag)
            st = {**stages[key], **over, "output": folder}
            cpu = wall = 0.0
            if s1_over is not None:
                s1 = {**stages["gendd-stage1"], **s1_over, "output": folder + "-s1"}
                _, c, w = timed(s1)
                cpu, wall = cpu + c, wall + w
                st["init"] = os.path.join(s1["output"], "last.pt")
            res, c, w = timed(st)
            cpu, wall = cpu + c, wall + w
            row = {"variant": name, "seed": seed, "epochs": st["epochs"],
                   "top1": demo.metric(res, "top1"), "sample_top1": demo.metric(res, "sample_top1"),
                   "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
            record["runs"].append(row)
            save()
            print(json.dumps(row), flush=True)
    save()


if __name__ == "__main__":
    main()
