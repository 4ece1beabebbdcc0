"""Every Triton launch of a fused-head training step, compiled ahead of time for every supported
GPU: shared memory, registers and spills per specialisation. No GPU needed.

    python benchmarks/launch_matrix.py               # 6 archs x bf16/fp16/fp32 x 3 shapes
    python benchmarks/launch_matrix.py --archs 80 --dtypes bf16 --shapes cifar

These are compile-time facts (``triton.compile`` for the target, ``ptxas -v``), not
measurements on a device: they say each launch fits the GPU, not how fast it runs. The
per-arch summary (specialisations, worst shared memory, registers, spills) is printed and
written to benchmarks/results/ (kept in git); the full record, one row per specialisation, goes
to benchmarks/records/ (git-ignored: 1,170 rows are some 56,000 lines of JSON). Exit status 1
when any launch does not fit. CI runs a subset of this matrix (tests/test_launch_configs.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, device_info, print_table, write_result  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "benchmarks", "records")  # git-ignored


def summarise(rows, limits=None):
    """Per arch: how many specialisations were compiled, the worst shared memory (and where),
    the most registers, the largest spills (all kernels, and the bf16 / fp16 GEMMs alone), and
    how many launches did not fit."""
    out = {}
    for r in rows:
        a = out.setdefault(f"sm_{r['arch']}", dict(arch=r["arch"], specialisations=0,
                                                    not_fitting=0, errors=0, max_shared=0,
                                                    max_registers=0, max_spill_stores=0,
                                                    max_spill_loads=0, max_spill_stores_hot=0))
        a["specialisations"] += 1
        a["not_fitting"] += not r.get("ok", True)
        if "error" in r:
            a["errors"] += 1
            continue
        if r["shared"] > a["max_shared"]:
            a.update(max_shared=r["shared"], max_shared_at=f"{r['dtype']} {r['kernel']} {r['call']}")
        a["max_registers"] = max(a["max_registers"], r["registers"])
        a["max_spill_stores"] = max(a["max_spill_stores"], r["spill_stores"])
        a["max_spill_loads"] = max(a["max_spill_loads"], r["spill_loads"])
        if r["dtype"] != "fp32" and r["kernel"] == "_matmul_kernel":
            a["max_spill_stores_hot"] = max(a["max_spill_stores_hot"], r["spill_stores"])
    for name, a in out.items():
        if limits and name in limits:
            a["shared_limit"] = limits[name]
    return [out[k] for k in sorted(out, key=lambda k: out[k]["arch"])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="80,86,89,90,100,120")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--shapes", default="cifar,r34,r50")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--out", default=RESULTS, help="where the per-arch summary goes")
    ap.add_argument("--records", default=RECORDS, help="where the full record goes")
    args = ap.parse_args(argv)
    # the real triton.jit: a process of its own, whatever this one was started with
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["GENDD_FAST_POISON"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        proc = subprocess.run([sys.executable, "-m", "gendd_fast.launch_check",
                               "--archs", args.archs, "--dtypes", args.dtypes, "--shapes",
                               args.shapes, "--jobs", str(args.jobs), "--json", path],
                              cwd=ROOT, env=env)
        if not os.path.exists(path):
            raise SystemExit(f"launch_check failed (exit {proc.returncode})")
        with open(path) as fh:
            summary = json.load(fh)
    per_arch = summarise(summary["rows"], {a: w["limit"] for a, w in summary["worst"].items()})
    print_table(per_arch, ["arch", "specialisations", "shared_limit", "max_shared",
                           "max_registers", "max_spill_stores_hot", "max_spill_stores",
                           "not_fitting"],
                "per arch over every launch (compile-time facts, no device)")
    for p in summary["problems"]:
        print("PROBLEM:", p)
    info = device_info(torch.device("cpu"))
    cfg = dict(archs=args.archs, dtypes=args.dtypes, shapes=args.shapes, width=1024, depth=3,
               token_dim=64, kind="ahead-of-time compile facts (triton.compile + ptxas -v), "
                                  "not device measurements",
               worst=summary["worst"], problems=summary["problems"])
    write_result("launch_matrix_full", info, cfg, summary["rows"], args.records)
    write_result("launch_matrix_summary", info, cfg, per_arch, args.out)
    if summary["problems"]:
        raise SystemExit(1)
    return summary["rows"]


if __name__ == "__main__":
    main()
