"""What one forward + backward of the GenDD head costs the host, counted on CPU: fused against
the eager reference, optionally against the fused head of an older commit, in one run.

    python benchmarks/step_accounting.py                    # this tree: fused vs reference
    python benchmarks/step_accounting.py --baseline HEAD~3  # plus the fused head of HEAD~3

Per step it reports
- launches: Triton kernels plus the PyTorch ops that would launch a device kernel (every aten
  op except views, allocations and metadata), counted at the real shape (CIFAR: 7,680 rows,
  width 1024, depth 3, bf16 autocast) with the Triton kernels recorded, not run;
- host microseconds: thread CPU time of one fwd+bwd at a tiny shape (the minimum over the
  repeats, the least the host needs: robust to other processes on a shared machine; the
  median is recorded too), each Triton launch
  replaced by the work of Triton's cache-hit path (argument binding, specialisation key,
  kernel-cache lookup; not the C launcher, which no CPU can run) and the torch ops running on
  CPU at that tiny shape, so both sides pay dispatch rather than arithmetic;
- bytes: the Triton kernels' bytes from the roofline model (each tree's own
  benchmarks/perf_model.py: a baseline is modelled by the model of its commit) plus the
  bytes every counted torch op reads and writes (tensor inputs + outputs, measured);
- executed FLOPs: 2 M N K of every GEMM actually launched (Triton and torch), against the
  reference formulation's count (bench_head.reference_flops_per_row).

The reference's launch count is taken at a smaller row count (its launches do not depend on
it; running it at 7,680 rows on CPU would take minutes). The baseline runs from
``git archive`` of that commit in a process of its own. The fused-vs-reference host ratio is
always measured in one process.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIFAR = dict(images=64, tokens=4, mul=30, z=256)
TINY = dict(images=2, tokens=4, mul=2, z=32)


# -- counting -------------------------------------------------------------------------------------
def _is_view_or_alloc(func) -> bool:
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    base = name.split(".")[0]
    if base in ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                "detach", "alias", "lift_fresh", "_local_scalar_dense_noop", "set_",
                "resize_", "is_same_size", "_has_compatible_shallow_copy_type"):
        return True
    schema = func._schema
    for r in schema.returns:  # an output that aliases an input without writing it: a view
        if r.alias_info is not None and not r.alias_info.is_write:
            return True
    return False


def _nbytes(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _mm_flops(name, args, out):
    """2 M N K of the torch GEMMs (mm, addmm, bmm, linear's decompositions)."""
    import torch
    base = name.split(".")[0]
    if base in ("mm", "addmm", "bmm", "baddbmm") and isinstance(out, torch.Tensor):
        a = args[1] if base in ("addmm", "baddbmm") else args[0]
        return 2 * out.numel() * a.shape[-1]
    return 0


@contextlib.contextmanager
def counting(stats, run_kernels=False):
    """Within the block every aten op that launches a device kernel and every Triton launch is
    counted into ``stats``; Triton kernels do the cache-hit work only (``run_kernels=False``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not _is_view_or_alloc(func):
                name = str(func.overloadpacket.__name__)
                stats["torch"][name] += 1
                stats["torch_bytes"] += _nbytes(list(args)) + _nbytes(out)
                stats["torch_flops"] += _mm_flops(name, args, out)
            return out

    with launches_replaced(stats, run_kernels), Count():
        yield stats


def new_stats():
    return dict(torch=collections.Counter(), triton=collections.Counter(), torch_bytes=0,
                torch_flops=0, triton_flops=0)


@contextlib.contextmanager
def launches_replaced(stats, run_kernels=False):
    """Triton launches counted (kernel name, and 2 M N K of the fused GEMM); unless
    ``run_kernels``, each does what ``JITFunction.run`` does on a kernel-cache hit up to the C
    launcher (bind the arguments, build the specialisation key, look the kernel up) and nothing
    runs. Needs the real ``triton.jit`` (not the interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import (JITFunction, compute_cache_key,
                                    create_function_from_signature)

    original = JITFunction.run
    backend = make_backend(GPUTarget("cuda", 90, 32))
    caches = {}  # per kernel, as JITFunction.run's self.device_caches[device]: an int-keyed
    # lookup (keying on the JITFunction itself would hash its source key on every launch)

    def cache_hit(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        entry = caches.get(id(self))
        if entry is None:
            entry = caches[id(self)] = ({}, {}, create_function_from_signature(
                self.signature, self.params, backend))
        kernel_cache, key_cache, binder = entry
        bound, spec, options = binder(*args, **kwargs)
        key = compute_cache_key(key_cache, spec, options)
        if kernel_cache.get(key) is None:
            kernel_cache[key] = True
        for (name, _), (val, globals_dict) in self.used_global_vals.items():
            if globals_dict.get(name) != val:
                raise RuntimeError(f"global {name} changed")
        if callable(grid):
            grid = grid(bound)
        stats["triton"][self.__name__] += 1
        if "dims" in bound or "A_MODE" in bound:  # a GEMM: (M, N, K) as dims, or by name
            M, N, K = bound["dims"] if "dims" in bound else (bound["M"], bound["N"], bound["K"])
            stats["triton_flops"] += 2 * M * N * K
        if run_kernels:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    JITFunction.run = cache_hit
    try:
        yield
    finally:
        JITFunction.run = original


# -- the two steps --------------------------------------------------------------------------------
def make_inputs(shape, W, depth, d, seed=0):
    import torch
    from gendd_fast import DiffLoss, FusedDiffLoss
    from gendd_fast.head import draw_row_randomness
    B, L, M, zc = shape["images"], shape["tokens"], shape["mul"], shape["z"]
    torch.manual_seed(seed)
    ref = DiffLoss(d, zc, depth, W, "64", L)
    fused = FusedDiffLoss(d, zc, depth, W, "64", L)
    fused.load_state_dict(ref.state_dict())
    fused.distinct_steps_on_cpu = False  # the path CUDA runs: no unique(), no host sync
    target = torch.randn(B, L * d)
    z = torch.randn(B, zc, requires_grad=True)
    n = B * L * M
    keep, t, noise = draw_row_randomness(n, d, 0.2, "cpu")
    x0 = target.reshape(B * L, d).repeat(M, 1)
    r = torch.arange(n) % (B * L)
    k = r % L
    ci = torch.where(keep, r // L, torch.full_like(r, B))
    zr = z.detach().repeat_interleave(L, 0).repeat(M, 1) * keep[:, None]

    def ref_step():
        loss = ref.train_diffusion.training_losses(ref.net, x0, t, dict(c=zr, chunk_idx=k),
                                                   noise)["loss"].mean()
        loss.backward()

    import inspect
    if "reduction" in inspect.signature(fused.row_losses).parameters:
        def fused_step():  # the distill path: the mean inside the one function
            fused.row_losses(x0, t, noise, k, z, ci, reduction="mean").backward()
    else:
        def fused_step():  # an older head: per-row losses, then the mean
            fused.row_losses(x0, t, noise, k, z, ci).mean().backward()

    def clear():
        z.grad = None
        for p in list(ref.parameters()) + list(fused.parameters()):
            p.grad = None
    return ref_step, fused_step, clear, n


def bf16(fn):
    import torch

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
    return run


def count_once(fn, clear):
    stats = new_stats()
    clear()
    with counting(stats):
        fn()
    clear()
    return stats


def host_us(fns, clear, repeats):
    """Per function: ((minimum, median) thread CPU time in us, Python function calls) of one
    call with Triton launches at their cache-hit cost. The functions run interleaved, so a
    change in the machine's load reaches all of them alike."""
    import gc
    stats = new_stats()
    times = [[] for _ in fns]
    calls = []
    gc.collect()
    gc.disable()  # as timeit does: a collection would land on whichever step is running
    with launches_replaced(stats):
        for i in range(repeats + 2):
            for j, fn in enumerate(fns):
                clear()
                t0 = time.thread_time_ns()
                fn()
                dt = time.thread_time_ns() - t0
                if i >= 2:
                    times[j].append(dt / 1e3)
        for fn in fns:
            count = [0]

            def prof(frame, event, arg, count=count):
                if event == "call":
                    count[0] += 1
            clear()
            sys.setprofile(prof)
            try:
                fn()
            finally:
                sys.setprofile(None)
            calls.append(count[0])
    gc.enable()
    clear()
    out = []
    for ts, c in zip(times, calls):
        ts.sort()
        out.append(((ts[0], ts[len(ts) // 2]), c))
    return out


def record_grids(n, W, depth, d):
    """perf_model.record_grids (sm_90, bf16) of the tree on the path; None where that tree's
    recorder does not take this call (an older tree: no grid-aware prediction for it)."""
    from perf_model import record_grids as record
    try:
        return record(n, "bf16", W, depth, d, z=CIFAR["z"])
    except Exception:  # noqa: BLE001
        return None


def worker(args):
    """Measure the tree on sys.path (this one or a baseline) and print one JSON line."""
    import torch
    torch.set_num_threads(1)
    W, depth, d = args.width, args.depth, 64
    out = {}
    # launches, bytes and FLOPs at the real shape: fused (kernels recorded, not run)
    _, fused_step, clear, n = make_inputs(CIFAR, W, depth, d)
    with launches_replaced(new_stats()):
        bf16(fused_step)()  # first step: weight casts, tables, configurations
    clear()
    s = count_once(bf16(fused_step), clear)
    out["fused"] = dict(rows=n, triton=sum(s["triton"].values()), torch=sum(s["torch"].values()),
                        torch_ops=dict(s["torch"]), triton_kernels=dict(s["triton"]),
                        glue_bytes=s["torch_bytes"], executed_flops=s["triton_flops"]
                        + s["torch_flops"])
    out["fused"]["grids"] = record_grids(n, W, depth, d)
    if args.reference:
        small = dict(CIFAR, mul=1, images=4)
        ref_step, _, clear_r, n_small = make_inputs(small, W, depth, d)
        s = count_once(bf16(ref_step), clear_r)
        out["reference"] = dict(rows=n_small, triton=0, torch=sum(s["torch"].values()),
                                torch_ops=dict(s["torch"]))
    # host cost at a tiny shape
    ref_step, fused_step, clear, _ = make_inputs(TINY, args.tiny_width, depth, 16)
    fns = [bf16(fused_step)] + ([bf16(ref_step)] if args.reference else [])
    for name, (us, calls) in zip(("fused", "reference"), host_us(fns, clear, args.repeats)):
        out[name].update(host_us=us[0], host_us_median=us[1], python_calls=calls)
    print("ACCOUNTING " + json.dumps(out))


def run_worker(pythonpath, reference, args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = pythonpath + os.pathsep + HERE
    env["GENDD_FAST_POISON"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--width", str(args.width),
           "--depth", str(args.depth), "--tiny-width", str(args.tiny_width), "--repeats",
           str(args.repeats)] + (["--reference"] if reference else [])
    proc = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ACCOUNTING "):
            return json.loads(line[len("ACCOUNTING "):])
    raise RuntimeError(f"accounting worker failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def checkout(rev, dest):
    """The tracked tree of ``rev`` in ``dest`` (plus the compiled extension of this tree)."""
    arc = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=arc.stdout, check=True)
    for f in os.listdir(os.path.join(ROOT, "gendd_fast")):
        if f.startswith("_C") and f.endswith(".so"):
            shutil.copy(os.path.join(ROOT, "gendd_fast", f), os.path.join(dest, "gendd_fast"))


def load_model(tree):
    """The roofline model (benchmarks/perf_model.py) of ``tree``: each tree's model describes
    its own kernels, so a baseline's bytes come from the baseline's model."""
    import runpy
    return runpy.run_path(os.path.join(tree, "benchmarks", "perf_model.py"), run_name="model")


def model_bytes(model, n, W, depth, d):
    return sum(k["bytes"] for k in model["step_kernels"](n, W, depth, d, "bf16"))


def predicted_ms(model, n, W, depth, d, glue_bytes, grids=None, gpu="H100"):
    """(roofline ms, grid-aware ms or None) of the step on ``gpu``, glue bytes included: the
    grid-aware figure charges a grid under one wave of 132 SMs for the SMs it leaves idle
    (this tree's perf_model.with_grids, applied to the tree's own kernel list)."""
    from perf_model import with_grids
    peaks = model["peaks_for"](gpu)
    rows = model["predict"](model["step_kernels"](n, W, depth, d, "bf16"), peaks, "bf16")
    glue = glue_bytes / peaks["bw"] * 1e3
    fill = with_grids(rows, grids) if grids else None
    return (sum(k["pred_ms"] for k in rows) + glue,
            sum(k["grid_ms"] for k in fill) + glue if fill else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="git revision whose fused head to count too")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--tiny-width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, HERE)
    from common import device_info, print_table, write_result
    from bench_head import reference_flops_per_row
    import torch

    cur = run_worker(ROOT, True, args)
    variants = [("reference (eager)", cur["reference"], None),
                ("fused (this tree)", cur["fused"], load_model(ROOT))]
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            checkout(args.baseline, tmp)
            base = run_worker(tmp, False, args)
            base_model = load_model(tmp)
        variants.insert(1, (f"fused ({args.baseline})", base["fused"], base_model))
    W, depth, d = args.width, args.depth, 64
    n = CIFAR["images"] * CIFAR["tokens"] * CIFAR["mul"]
    ref_flops = reference_flops_per_row(W, depth, d, CIFAR["z"]) * n
    rows = []
    for name, m, model in variants:
        row = dict(variant=name, launches=m["triton"] + m["torch"], triton=m["triton"],
                   torch_ops=m["torch"], host_us=m["host_us"],
                   host_us_median=m["host_us_median"], python_calls=m["python_calls"])
        if model is not None:
            kb = model_bytes(model, n, W, depth, d)
            pred = predicted_ms(model, n, W, depth, d, m["glue_bytes"], m.get("grids"))
            row.update(kernel_mb=kb / 1e6, glue_mb=m["glue_bytes"] / 1e6,
                       bytes_mb=(kb + m["glue_bytes"]) / 1e6,
                       executed_gflop=m["executed_flops"] / 1e9,
                       reference_gflop=ref_flops / 1e9,
                       h100_pred_ms=pred[0], h100_grid_ms=pred[1],
                       torch_op_counts=m["torch_ops"], triton_kernel_counts=m["triton_kernels"])
        else:
            row.update(reference_gflop=ref_flops / 1e9, torch_op_counts=m["torch_ops"])
        rows.append(row)
    ratio = cur["fused"]["host_us"] / cur["reference"]["host_us"]
    print_table(rows, ["variant", "launches", "triton", "torch_ops", "host_us", "python_calls",
                       "bytes_mb", "glue_mb", "executed_gflop", "reference_gflop",
                       "h100_pred_ms", "h100_grid_ms"],
                f"one head forward+backward, CIFAR shape ({n} rows, width {W}, depth {depth}, "
                f"bf16); host time at a tiny shape ({TINY}, width {args.tiny_width})")
    print(f"host cost fused / eager reference (one process): {ratio:.3f}")
    info = device_info(torch.device("cpu"))
    cfg = dict(shape=dict(CIFAR, width=W, depth=depth, token_dim=d), tiny=dict(
        TINY, width=args.tiny_width, token_dim=16), repeats=args.repeats,
        baseline=args.baseline, host_ratio_fused_over_reference=ratio,
        statistic="launches per fwd+bwd; minimum (and median) thread CPU us per fwd+bwd",
        note=__doc__.split("\n\n")[1])
    write_result("step_accounting", info, cfg, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
