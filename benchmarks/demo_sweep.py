"""Why does GenDD trail at short schedules? One-factor-at-a-time sweep around the demo's setting.

Trains the demo's teacher once (reused when OUTPUT/teacher/last.pt exists), then, for each seed,
the scratch student, KD and a set of GenDD variants that each change one thing from the demo's
GenDD: learning rate, stage-1 warm start (off / longer), head width, ``mul`` (copies per token) and
``smooth`` (distribution contraction). Every run records held-out top-1 (GenDD: sampling top-1 and
linear probe) and its CPU time (``time.process_time``: all threads of this process, so it does not
grow when other jobs share the machine the way wall time does). Results go to a JSON file after
every run, so an interrupted sweep keeps what it measured.

    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py --seeds 0 1 --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from gendd_fast import demo  # noqa: E402
from gendd_fast.config import make_config  # noqa: E402
from gendd_fast.train import train  # noqa: E402

# name -> (method, overrides of the demo's fields (lr: both GenDD stages; the rest: stage 2),
# stage-1 epochs (0: no warm start; None: not GenDD)). The other GenDD variants change one thing
# from "gendd lr 2e-3" (the demo's GenDD, after "gendd lr 1e-2" measured far lower).
S1 = demo.STAGE1_EPOCHS
VARIANTS = {
    "scratch lr 2e-3": ("ce", {"lr": 2e-3}, None),
    "scratch lr 1e-2": ("ce", {"lr": 1e-2}, None),
    "kd lr 2e-3": ("kd", {"lr": 2e-3}, None),
    "kd lr 1e-2": ("kd", {"lr": 1e-2}, None),
    "gendd lr 2e-3": ("gendd", {"lr": 2e-3}, S1),
    "gendd lr 1e-2": ("gendd", {"lr": 1e-2}, S1),
    "gendd no stage 1": ("gendd", {"lr": 2e-3}, 0),
    "gendd stage 1 x2": ("gendd", {"lr": 2e-3}, 2 * S1),
    "gendd width 128": ("gendd", {"lr": 2e-3, "diffloss_w": 128}, S1),
    "gendd width 512": ("gendd", {"lr": 2e-3, "diffloss_w": 512}, S1),
    "gendd mul 3": ("gendd", {"lr": 2e-3, "mul": 3}, S1),
    "gendd mul 30": ("gendd", {"lr": 2e-3, "mul": 30}, S1),
    "gendd smooth 0": ("gendd", {"lr": 2e-3, "smooth": 0.0}, S1),
    "gendd smooth 0.7": ("gendd", {"lr": 2e-3, "smooth": 0.7}, S1),
}


def timed(fields):
    c0, t0 = time.process_time(), time.time()
    res = train(make_config(**{k: v for k, v in fields.items() if k != "name"}))
    return res, time.process_time() - c0, time.time() - t0


def report(paths):
    """Markdown table of the runs in sweep JSON files (mean over the seeds each variant ran)."""
    runs, base = {}, None
    for path in paths:
        with open(path) as fh:
            rec = json.load(fh)
        base = base or rec["setting"]
        for r in rec["runs"]:
            runs.setdefault((r["variant"], rec["setting"]["student_epochs"]), []).append(r)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| variant | student epochs | seeds | top-1 (GenDD: sampling) | GenDD linear probe "
             "| CPU s per run |", "|---|---|---|---|---|---|"]
    for (name, epochs), rs in runs.items():
        def mean(k):
            return (sum(r[k] for r in rs) / len(rs)) if rs[0][k] is not None else None
        head = mean("sample_top1") if rs[0]["sample_top1"] is not None else mean("top1")
        probe = mean("top1") if rs[0]["sample_top1"] is not None else None
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {name} | {epochs} | {seeds} | {fmt(head)} | {fmt(probe)} | "
                     f"{fmt(mean('cpu_s'))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=os.path.join("runs", "demo-sweep"))
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "demo_sweep.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=demo.STUDENT_EPOCHS, help="student epochs")
    p.add_argument("--sampling-steps", default="64")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print the markdown table of these result files and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    teacher = demo.teacher_stage(args.output)
    teacher.update(progress=False)
    record = {"setting": {"dataset": "digits", "teacher": demo.TEACHER, "student": demo.STUDENT,
                          "teacher_epochs": demo.TEACHER_EPOCHS, "student_epochs": args.epochs,
                          "sampling_steps": args.sampling_steps, "seeds": args.seeds,
                          "gendd_head": demo.GENDD_HEAD},
              "host": {"cpu": platform.processor() or platform.machine(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "runs": []}
    if not os.path.isfile(os.path.join(args.output, "teacher", "last.pt")):
        res, cpu, wall = timed(teacher)
        record["teacher"] = {"top1": demo.metric(res, "top1"), "cpu_s": round(cpu, 1)}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=2)

    for seed in args.seeds:
        for name in names:
            method, over, s1 = VARIANTS[name]
            stages = {s["name"]: s for s in demo.student_stages(
                args.output, seed, epochs=args.epochs, stage1_epochs=max(s1 or 1, 1),
                sampling_steps=args.sampling_steps)}
            tag = name.replace(" ", "_").replace("(", "").replace(")", "")
            key = {"ce": "scratch", "kd": "kd", "gendd": "gendd"}[method]
            st = {**stages[key], **over, "progress": False,
                  "output": os.path.join(args.output, f"seed{seed}", tag)}
            cpu = wall = 0.0
            if method == "gendd":
                st["init"] = None
                if s1:
                    s1_stage = {**stages["gendd-stage1"], "progress": False,
                                **({"lr": over["lr"]} if "lr" in over else {}),
                                "output": os.path.join(args.output, f"seed{seed}", tag + "-s1")}
                    _, c, w = timed(s1_stage)
                    cpu, wall = cpu + c, wall + w
                    st["init"] = os.path.join(s1_stage["output"], "last.pt")
            res, c, w = timed(st)
            cpu, wall = cpu + c, wall + w
            row = {"variant": name, "seed": seed, "top1": demo.metric(res, "top1"),
                   "sample_top1": demo.metric(res, "sample_top1"), "cpu_s": round(cpu, 1),
                   "wall_s": round(wall, 1)}
            record["runs"].append(row)
            save()
            print(json.dumps(row), flush=True)
    save()


if __name__ == "__main__":
    main()
