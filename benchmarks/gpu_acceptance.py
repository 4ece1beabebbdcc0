"""One command that verifies the project on a GPU: the GPU tests and a quick run of every
benchmark, with one JSON summary. Sized for a 10-minute GPU window (about 6-8 minutes on one
H100, most of it Triton compiling the fused head's kernels once).

    python benchmarks/gpu_acceptance.py              # on the GPU machine
    python benchmarks/gpu_acceptance.py --smoke      # CPU: tiny shapes through the interpreter

Steps, each a subprocess with its own time limit (one failing step does not stop the rest):
the pre-flight launch check of the fused head on this GPU (every kernel compiled, its shared
memory against the device's limit), ``pytest tests_gpu``, then bench_head (with the
performance model's prediction beside each kernel), bench_train, bench_sampler and bench_data
at reduced sizes. The summary (device, versions, each step's exit status, time and the JSON
results it wrote, and the tail of its output) goes to
benchmarks/results/gpu_acceptance_<device>_<date>.json. Exit status 1 if any step failed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, device_info, pick_device, print_table, write_result  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

PREFLIGHT = """
import sys, torch
from gendd_fast.launch_check import fused_launch_problem
rows = [int(r) for r in sys.argv[1].split(",")]
for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
    why = fused_launch_problem(torch.device("cuda"), dt, dict(width=1024, depth=3, token_dim=64,
                                                              rows=rows))
    print(name, "ok" if why is None else why, flush=True)
    if why:
        sys.exit(1)
"""


def steps(smoke: bool, py: str):
    """(name, argv, time limit in s, gpu only). Quick sizes on a GPU, tiny ones for --smoke."""
    b = lambda s: os.path.join(BENCH, s)  # noqa: E731
    if smoke:
        return [
            ("bench_head", [py, b("bench_head.py"), "--device", "cpu", "--scale", "0.01",
                            "--width", "32", "--repeats", "1", "--shapes", "cifar",
                            "--no-compile", "--mul", "1"], 600, False),
            ("bench_train", [py, b("bench_train.py"), "--device", "cpu", "--shapes", "cifar",
                             "--batch", "2", "--width", "32", "--steps", "1", "--mul", "1"],
             600, False),
            ("bench_sampler", [py, b("bench_sampler.py"), "--device", "cpu", "--images", "2",
                               "--steps", "3", "--width", "32", "--repeats", "1", "--shapes",
                               "cifar"], 600, False),
        ]
    return [
        ("preflight", [py, "-c", PREFLIGHT, "7680,5120,20480"], 180, True),
        ("tests_gpu", [py, "-m", "pytest", "-q", "-x", os.path.join(ROOT, "tests_gpu")], 180,
         True),
        # torch.compile of the reference alone takes about a minute: the full run has it
        ("bench_head", [py, b("bench_head.py"), "--scale", "0.25", "--repeats", "5",
                        "--no-compile"], 120, True),
        ("bench_train", [py, b("bench_train.py"), "--steps", "5", "--batch", "32"], 120, True),
        ("bench_sampler", [py, b("bench_sampler.py"), "--images", "64", "--steps", "16",
                           "--repeats", "2"], 60, True),
        # decode for >= 2 s per loader: a single batch cannot support an images/s claim
        ("bench_data", [py, b("bench_data.py"), "--images", "128", "--min-seconds", "2"], 90,
         False),
    ]


def run_step(name, argv, limit, out_dir, env):
    """Run one step; benchmarks write their JSON into ``out_dir`` (collected into the summary)."""
    sub = os.path.join(out_dir, name)
    os.makedirs(sub, exist_ok=True)
    if os.path.basename(argv[1] if len(argv) > 1 else "").startswith("bench_"):
        argv = argv + ["--out", sub]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                else (e.stdout or "")) + f"\n[stopped after {limit} s]"
    wall = time.perf_counter() - t0
    results = []
    for path in sorted(glob.glob(os.path.join(sub, "*.json"))):
        with open(path) as fh:
            results.append(json.load(fh))
    return dict(step=name, rc=rc, ok=rc == 0, seconds=round(wall, 1), limit_s=limit,
                command=" ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a
                                 for a in argv[:2]) + " " + " ".join(argv[2:])
                if argv[1] != "-c" else f"{argv[0]} -c <preflight> {' '.join(argv[3:])}",
                results=results, output_tail=text[-3000:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run: tiny shapes through Triton's interpreter")
    ap.add_argument("--only", default=None, help="comma-separated step names to run")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    device = pick_device("cpu" if args.smoke else "auto")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("gpu_acceptance: no CUDA device here; use --smoke for the CPU run")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    todo = steps(args.smoke, sys.executable)
    if args.only:
        keep = set(args.only.split(","))
        todo = [s for s in todo if s[0] in keep]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd, limit, _ in todo:
            print(f"[gpu_acceptance] {name} (limit {limit} s) ...", flush=True)
            rows.append(run_step(name, cmd, limit, tmp, env))
            print(f"[gpu_acceptance] {name}: rc={rows[-1]['rc']} in {rows[-1]['seconds']} s",
                  flush=True)
    total = time.perf_counter() - t0
    print_table(rows, ["step", "rc", "seconds", "limit_s"],
                f"acceptance on {device} ({'smoke, interpreter' if args.smoke else 'GPU'}), "
                f"{total:.0f} s in all")
    for r in rows:
        if not r["ok"]:
            print(f"\n--- {r['step']} failed; last output:\n{r['output_tail'][-1500:]}")
    info = device_info(device)
    cfg = dict(smoke=args.smoke, total_seconds=round(total, 1),
               all_ok=all(r["ok"] for r in rows))
    write_result("gpu_acceptance", info, cfg, rows, args.out)
    if not cfg["all_ok"]:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
