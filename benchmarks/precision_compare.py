"""Does bf16 autocast cost accuracy? The demo's GenDD stage trained in fp32 and under bf16
autocast with the same seeds, on CPU, reported as mean +- std over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/precision_compare.py --seeds 0 1 2 --epochs 12

The teacher and the stage-1 warm start are trained once (fp32, seed 0) and shared, so the only
differences between two runs of one seed are the precision of the GenDD stage (student, teacher
forward and diffusion head under autocast; the sampler runs in fp32 either way) and what follows
from it. Each run's linear-probe top-1, sampling top-1 and wall time go to the JSON record.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, device_info, print_table, write_result  # noqa: E402

from gendd_fast import demo  # noqa: E402
from gendd_fast.config import make_config  # noqa: E402
from gendd_fast.train import train  # noqa: E402


def _fields(stage):
    return {k: v for k, v in stage.items() if k != "name"}


def summarise(runs, amp):
    rows = [r for r in runs if r["amp"] == amp]
    out = {"amp": amp, "seeds": len(rows)}
    for key in ("top1", "sample_top1", "seconds"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[f"{key}_mean"] = statistics.fmean(vals)
            out[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12, help="epochs of the GenDD stage")
    p.add_argument("--base-epochs", type=int, default=12, help="epochs of the teacher")
    p.add_argument("--sampling-steps", default="64")
    p.add_argument("--work", default=os.path.join("runs", "precision-compare"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)

    device = torch.device("cpu")
    common = dict(device="cpu", progress=False, plot=False, overwrite=True)
    # the demo's own stages: its teacher, then the label-scarce GenDD of seed 0 (stage 1, 2)
    students = {s["name"]: s for s in demo.student_stages(args.work, 0,
                                                          sampling_steps=args.sampling_steps)}
    for st in (demo.teacher_stage(args.work, epochs=args.base_epochs),
               students["gendd-stage1"]):  # trained once in fp32, shared by every GenDD run
        train(make_config(**{**_fields(st), **common, "amp": "off"}))
    gendd = _fields(students["gendd"])
    runs = []
    for seed in args.seeds:
        for amp in ("off", "bf16"):
            t0 = time.time()
            res = train(make_config(**{**gendd, **common, "epochs": args.epochs,
                                       "eval_every": args.epochs, "seed": seed, "amp": amp,
                                       "output": os.path.join(args.work, f"gendd-{amp}-{seed}")}))
            runs.append({"amp": amp, "seed": seed, "top1": res["top1"],
                         "sample_top1": res.get("sample_top1"),
                         "seconds": round(time.time() - t0, 1)})
            print(runs[-1], flush=True)
    rows = [summarise(runs, "off"), summarise(runs, "bf16")]
    print_table(rows, ["amp", "seeds", "top1_mean", "top1_std", "sample_top1_mean",
                       "sample_top1_std", "seconds_mean"],
                "GenDD stage on digits: fp32 ('off') vs bf16 autocast, mean +- std over seeds")
    write_result("precision", device_info(device),
                 {"seeds": args.seeds, "epochs": args.epochs, "base_epochs": args.base_epochs,
                  "sampling_steps": args.sampling_steps, "gendd": gendd,
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                 rows + runs, args.out)
    return rows + runs


if __name__ == "__main__":
    main()
