"""The fused head's launch pre-flight: every Triton launch of a fused-head training step,
recorded and compiled ahead of time.

No GPU is needed. :func:`record_step` runs one forward + backward of :class:`FusedDiffLoss` at
the real shapes on CPU with the launch of every ``@triton.jit`` kernel replaced by a recorder
that keeps what the real launch would compile: the binding's signature (dtypes and the
alignment specialisations), the constexprs, ``num_warps`` and ``num_stages``. Launch
configurations are chosen as for a given GPU (:func:`limits.simulate_arch`).
:func:`compile_launch` then compiles one record for that GPU with ``triton.compile`` and returns
the facts a launch depends on: shared memory (``metadata.shared``), registers and spill bytes
(from the ``ptxas -v`` log). These are compile-time facts; a GPU run is still needed for speed.

Compiles are cached on disk (``GENDD_LAUNCH_CACHE``, default ``.launch_cache/`` at the repository
root, git-ignored), keyed by kernel source, binding, constexprs, options, arch and Triton version.

Needs the real ``triton.jit`` (``TRITON_INTERPRET`` unset); ``python -m
gendd_fast.launch_check`` runs the check from a process of its own. :func:`fused_launch_problem`
is the trainer's check before step 1. It sits beside the head it drives, above ``kernels/``,
which imports nothing of the package.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .fused_head import FusedDiffLoss, fused_unavailable_reason
from .kernels.limits import SHARED_MEMORY_OPTIN, SUPPORTED_ARCHS, simulate_arch
from .kernels.matmul import cfg_values
from .kernels.utils import cdiv, interpreting, triton

# Training shapes (head width 1024, depth 3, 64-dim tokens): images x tokens x copies rows, and
# the condition width (the teacher feature size).
SHAPES = {"cifar": dict(images=64, tokens=4, mul=30, z=256),      # 7,680 rows
          "r34": dict(images=64, tokens=8, mul=10, z=512),        # 5,120 rows
          "r50": dict(images=64, tokens=32, mul=10, z=2048)}      # 20,480 rows
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WIDTH, DEPTH, TOKEN_DIM = 1024, 3, 64
REGISTERS_PER_THREAD = 255


@dataclass
class Launch:
    """What a kernel launch compiles: enough to rebuild its ``ASTSource``."""
    fn: object = field(repr=False)
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict
    attrs: Dict
    num_warps: int
    num_stages: int
    call: str = ""  # which op launched it (GEMM shape, operand dtypes)
    ctas: int = 0   # programs in the grid (the same binary may launch with other grids)
    dims: tuple = ()  # a GEMM's (M, N, K)

    def key(self, arch: int) -> str:
        blob = json.dumps([self.fn.cache_key, self.signature,
                           sorted(map(repr, self.constexprs.items())),
                           sorted(map(repr, self.attrs.items())), self.num_warps, self.num_stages,
                           arch, triton.__version__, "wgmma-v2"], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def constexpr_values(self) -> Dict[str, object]:
        """The kernel's own constexpr parameters (a key of one index; longer keys are
        elements of a tuple argument that Triton specialised, e.g. a unit stride)."""
        names = self.fn.arg_names
        out = {}
        for k, v in self.constexprs.items():
            if len(k) != 1:
                continue
            if names[k[0]] == "CFG" and self.kernel in GEMM_KERNELS:  # the GEMM's one tuple
                out.update(cfg_values(v))
            else:
                out[names[k[0]]] = v
        return out

    def pointer_dtypes(self) -> Dict[str, str]:
        """Every pointer argument's type, tuple elements named ``A[0]``."""
        out = {}

        def walk(name, ty):
            if isinstance(ty, (tuple, list)):
                for i, t in enumerate(ty):
                    walk(f"{name}[{i}]", t)
            elif isinstance(ty, str) and ty.startswith("*"):
                out[name] = ty
        for k, v in self.signature.items():
            walk(k, v)
        return out

    def describe(self) -> Dict:
        ptrs = self.pointer_dtypes()
        cv = self.constexpr_values()
        gemm = {}
        if self.dims:  # K blocks each program's loop runs (1: nothing for loads to overlap)
            split, bk = int(cv.get("SPLIT_K", 1)), int(cv["BLOCK_K"])
            gemm = dict(dims=list(self.dims), weight_gradient=bool(cv["A_T"]),
                        k_steps=cdiv(cdiv(self.dims[2], bk), split))
        return dict(kernel=self.kernel, call=self.call, ctas=self.ctas, **gemm,
                    split_k=int(cv.get("SPLIT_K", 1)),
                    num_warps=self.num_warps,
                    num_stages=self.num_stages, constexprs={k: str(v) for k, v in
                                                            self.constexpr_values().items()},
                    pointer_dtypes=ptrs)


def _require_jit():
    if triton is None:
        raise RuntimeError("launch_check needs Triton")
    if interpreting():
        raise RuntimeError("launch_check needs the real triton.jit: run it without "
                           "TRITON_INTERPRET=1 (python -m gendd_fast.launch_check)")


@contextlib.contextmanager
def recording(arch: int, limit: Optional[int] = None):
    """Within the block no kernel runs: each launch is appended to the yielded list instead,
    bound exactly as ``JITFunction.run`` binds it for a CUDA target of compute capability
    ``arch``, and launch configurations are chosen for that arch (or a ``limit`` in bytes)."""
    _require_jit()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}
    records: List[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec,
                                                                options)
        g = grid(bound) if callable(grid) else grid
        ctas = 1
        for x in g:
            ctas *= int(x)
        records.append(Launch(self, self.__name__, signature, constexprs, attrs,
                              options.num_warps, options.num_stages, _describe_call(bound),
                              ctas, tuple(bound["dims"]) if "dims" in bound else ()))

    JITFunction.run = record
    try:
        with simulate_arch(arch, limit):
            yield records
    finally:
        JITFunction.run = original


_MODES = {0: "plain", 1: "silu", 2: "lnmod", 3: "mul", 4: "noise"}
_EPIS = {0: "store", 1: "gate_residual", 2: "silu_grad", 3: "scatter"}


def _describe_call(bound) -> str:
    """A readable name for one launch: the GEMM problem and its prologues / epilogue."""
    if "dims" in bound and "CFG" in bound:
        cfg = cfg_values(bound["CFG"])
        a = _MODES[cfg["A_MODE"]] + ("^T" if cfg["A_T"] else "")
        M, N, K = bound["dims"]
        return (f"{M}x{N}x{K} A={a}:{bound['A'][0].dtype} "
                f"B={_MODES[cfg['B_MODE']]}:{bound['B'][0].dtype} epi={_EPIS[cfg['EPI']]}")
    n = bound.get("n_rows", bound.get("n"))
    return f"rows={n}"


def shape_rows(shape: str) -> int:
    s = SHAPES[shape]
    return s["images"] * s["tokens"] * s["mul"]


def record_step(arch: int, dtype: torch.dtype, rows, width: int = WIDTH, depth: int = DEPTH,
                token_dim: int = TOKEN_DIM, z: int = 256, device="cpu",
                limit: Optional[int] = None, images: Optional[int] = None) -> List[Launch]:
    """Every launch of one training step (forward + backward) of the fused head over ``rows``
    rows (an int, or a name in :data:`SHAPES`) from ``images`` images (default 64), with
    ``dtype`` the compute dtype (bf16 / fp16 autocast over fp32 masters, or plain fp32). The
    row count, the head's width, depth and token size shape the per-row kernels; the condition
    width ``z`` and the image count only ``cond_embed``'s three GEMMs (forward, dW, dz)."""
    if isinstance(rows, str):
        z, rows = SHAPES[rows]["z"], shape_rows(rows)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        head = FusedDiffLoss(token_dim, z, depth, width, "64", 1)
    head.distinct_steps_on_cpu = False  # the CUDA path: the time MLP over all 1000 timesteps
    # the images (cond_embed runs once per image, not per row), token 0; a fifth of the rows
    # dropped (cond_embed's bias alone)
    images = min(rows, images or 64)
    x0 = torch.randn(rows, token_dim, device=device, generator=gen)
    z_img = torch.randn(images, z, device=device, generator=gen, requires_grad=True)
    t = torch.randint(0, 1000, (rows,), device=device, generator=gen)
    noise = torch.randn(rows, token_dim, device=device, generator=gen)
    ci = torch.arange(rows, device=device) % images
    ci = torch.where(torch.rand(rows, device=device, generator=gen) < 0.2, images, ci)
    k = torch.zeros(rows, dtype=torch.long, device=device)
    autocast = dtype != torch.float32
    with recording(arch, limit) as records:
        with torch.autocast(device.type, dtype=dtype if autocast else torch.bfloat16,
                            enabled=autocast):
            loss = head.row_losses(x0, t, noise, k, z_img, ci).mean()
        loss.backward()
    return records


def unique_launches(records: Sequence[Launch]) -> List[Launch]:
    """One record per distinct compiled specialisation (same kernel, binding, constexprs and
    options compile to the same binary)."""
    seen, out = set(), []
    for rec in records:
        k = rec.key(0)
        if k not in seen:
            seen.add(k)
            out.append(rec)
    return out


def cache_dir() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("GENDD_LAUNCH_CACHE", os.path.join(root, ".launch_cache"))


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(rec: Launch, arch: int, use_cache: bool = True, registers: bool = True) -> Dict:
    """Compile ``rec`` for sm_``arch``. Returns shared (bytes), registers, spill_stores and
    spill_loads (bytes), or ``error`` where it does not compile. ``registers=False``: shared
    memory only, through Triton's own cache (what a launch on the device then reuses)."""
    if not registers:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        try:
            k = triton.compile(ASTSource(rec.fn, rec.signature, rec.constexprs, rec.attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=rec.num_warps, num_stages=rec.num_stages))
            return dict(shared=int(k.metadata.shared))
        except Exception as e:  # noqa: BLE001 - reported, with the kernel, by the caller
            return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    path = os.path.join(cache_dir(), f"sm{arch}", rec.key(arch) + ".json")
    if use_cache and os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs = triton.knobs
    log = io.StringIO()
    saved = (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log)
    knobs.compilation.always_compile = True   # a Triton cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(rec.fn, rec.signature, rec.constexprs, rec.attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=rec.num_warps, num_stages=rec.num_stages))
        text = log.getvalue()
        regs = [int(x) for x in _PTXAS_REGS.findall(text)]
        spills = [(int(a), int(b)) for a, b in _PTXAS_SPILL.findall(text)]
        if not regs:
            raise RuntimeError(f"no register count in the ptxas log:\n{text[-2000:]}")
        ttgir = k.asm.get("ttgir", "")
        res = dict(shared=int(k.metadata.shared), registers=max(regs),
                   # sm_90: the dot as wgmma, and how many wgmma groups stay in flight at
                   # the wait (0: each MMA waits for itself; 1: it overlaps the next K step)
                   wgmma="warp_group_dot" in ttgir,
                   wgmma_pendings=max((int(x) for x in re.findall(r"pendings = (\d+)", ttgir)),
                                      default=None),
                   spill_stores=max((a for a, _ in spills), default=0),
                   spill_loads=max((b for _, b in spills), default=0))
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a finding
        res = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh)
    os.replace(tmp, path)
    return res


GEMM_KERNELS = ("_matmul_kernel",)

# The data-centre GPUs the step is tuned for: their bf16 / fp16 GEMMs must not spill.
SPILL_FREE_ARCHS = (80, 90, 100)


def check(res: Dict, rec: Launch, arch: int) -> List[str]:
    """What is wrong with one compiled launch on sm_``arch`` (empty when it fits)."""
    name = f"sm_{arch} {rec.kernel} [{rec.call}] warps={rec.num_warps} stages={rec.num_stages}"
    if "error" in res:
        return [f"{name}: does not compile: {res['error']}"]
    out = []
    limit = SHARED_MEMORY_OPTIN[arch]
    if res["shared"] > limit:
        out.append(f"{name}: needs {res['shared']} B of shared memory, limit {limit} B")
    spills = res["spill_stores"] or res["spill_loads"]
    if arch in SPILL_FREE_ARCHS and is_hot_gemm(rec) and spills:
        out.append(f"{name}: spills ({res['spill_stores']} B stores, {res['spill_loads']} B "
                   f"loads, {res['registers']} registers)")
    return out


def async_mma(res: Dict, rec: Launch, arch: int) -> Optional[bool]:
    """Whether a GEMM's MMAs overlap its loads: on sm_90, wgmma with at least one group left in
    flight at the wait (the TTGIR's ``pendings``); elsewhere a software pipeline of two or more
    stages (cp.async). None for a kernel that is not a GEMM or did not compile."""
    if rec.kernel not in GEMM_KERNELS or "error" in res:
        return None
    if arch == 90:
        return bool(res.get("wgmma")) and (res.get("wgmma_pendings") or 0) >= 1
    return rec.num_stages >= 2


def is_hot_gemm(rec: Launch) -> bool:
    """A bf16 / fp16 GEMM: the kernels that carry the step, held to no spills."""
    if rec.kernel not in GEMM_KERNELS:
        return False
    return str(rec.constexpr_values().get("DOT_DTYPE")) in ("bf16", "fp16")


_pending: List = []


def _compile_pending(i: int) -> Dict:
    rec, arch, use_cache = _pending[i]
    return compile_launch(rec, arch, use_cache)


def run_matrix(combos, use_cache=True, jobs=1, log=print) -> Dict:
    """Record and compile every launch of each (arch, dtype name, shape) in ``combos``; returns
    the JSON-able summary: one row per specialisation, the problems found, the worst cases."""
    work = []  # (arch, dtype, shape, record)
    for arch, dname, shape in combos:
        recs = unique_launches(record_step(arch, DTYPES[dname], shape))
        log(f"sm_{arch} {dname} {shape}: {len(recs)} distinct specialisations")
        work += [(arch, dname, shape, r) for r in recs]
    _pending[:] = [(r, arch, use_cache) for arch, _, _, r in work]
    if jobs > 1:  # fork: the children inherit the records (kernels do not pickle)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
            results = list(ex.map(_compile_pending, range(len(work))))
    else:
        results = [_compile_pending(i) for i in range(len(work))]
    rows, problems = [], []
    for (arch, dname, shape, rec), res in zip(work, results):
        bad = check(res, rec, arch)
        problems += bad
        rows.append(dict(arch=arch, dtype=dname, shape=shape, **rec.describe(), **res,
                         ok=not bad, waves_132=round(rec.ctas / 132, 3),
                         async_mma=async_mma(res, rec, arch)))
    return dict(rows=rows, problems=problems, worst=worst_case(rows))


def worst_case(rows) -> Dict:
    """Per arch: the largest shared memory and register count over every launch."""
    out = {}
    for r in rows:
        if "error" in r:
            continue
        w = out.setdefault(f"sm_{r['arch']}", dict(limit=SHARED_MEMORY_OPTIN[r["arch"]],
                                                   max_shared=0, max_registers=0,
                                                   max_spill_stores_hot=0, max_spill_stores=0))
        if r["shared"] > w["max_shared"]:
            w.update(max_shared=r["shared"],
                     max_shared_at=f"{r['dtype']} {r['kernel']} {r['call']}")
        if r["registers"] > w["max_registers"]:
            w.update(max_registers=r["registers"],
                     max_registers_at=f"{r['dtype']} {r['kernel']} {r['call']}")
        w["max_spill_stores"] = max(w["max_spill_stores"], r["spill_stores"])
        if r["dtype"] != "fp32" and r["kernel"] in GEMM_KERNELS:
            w["max_spill_stores_hot"] = max(w["max_spill_stores_hot"], r["spill_stores"])
    return out


# Tokens per image of the teachers a run may distill (feature width / token size, up to 4096 /
# 64): the trainer knows the batch and the copies per token before it knows the teacher, and
# the GEMM tiles change only where the row count crosses a multiple of the head width.
TOKENS_PER_IMAGE = (1, 2, 4, 8, 16, 32, 64)


def fused_launch_problem(device, dtype: torch.dtype, shapes: Dict) -> Optional[str]:
    """Why the fused head cannot run a training step on ``device`` (None when it can).

    ``shapes``: ``width``, ``depth``, ``token_dim`` of the head and ``rows``, the row counts a
    step may have; optionally ``images`` (the batch, default 64) and ``z``, the condition width
    or a list of the widths a run may have (default 256). Every kernel specialisation such a
    step launches is compiled for this GPU before training (through Triton's cache, so step 1
    reuses the binaries) and its shared memory compared with the device's limit: a kernel that
    would stop training with ``OutOfResources`` is named here instead."""
    reason = fused_unavailable_reason(device)
    device = torch.device(device)
    if reason or device.type != "cuda":
        return reason  # None: the interpreter on CPU has no launch limits
    from .kernels.limits import shared_memory_limit
    major, minor = torch.cuda.get_device_capability(device)
    return launch_problem(10 * major + minor, shared_memory_limit(device), dtype, shapes, device)


def step_gemm_problems(arch: int, dtype: torch.dtype, width: int = WIDTH, depth: int = DEPTH,
                       token_dim: int = TOKEN_DIM, z: int = 256, device="cpu",
                       limit: Optional[int] = None, images: Optional[int] = None):
    """``(probe, problems)``: the ``matmul._launch`` arguments of every GEMM of one step,
    recorded at ``probe`` rows, a count no other dimension of the step equals, so wherever it
    appears in a problem it stands for the rows (:func:`row_class` substitutes others)."""
    from .kernels import matmul
    others = {width, token_dim, 2 * token_dim, 3 * width * depth + 2 * width, 1000, z,
              images or 64}
    probe = next(r for r in range(1237, 10 ** 6, 2) if r not in others and r > (images or 64))
    calls, real = [], matmul._launch
    matmul._launch = lambda *a: calls.append(a) or real(*a)
    try:
        record_step(arch, dtype, probe, width, depth, token_dim, z=z, device=device,
                    limit=limit, images=images)
    finally:
        matmul._launch = real
    return probe, calls


def row_class(r: int, probe: int, problems) -> tuple:
    """What a step over ``r`` rows compiles that depends on ``r``: the launch configuration
    ``matmul._launch`` gives each GEMM problem of :func:`step_gemm_problems` with ``r`` in
    place of the probe rows, and ``r``'s residue mod 16 (Triton specialises integers and
    pointer offsets on divisibility by 16) and ``r == 1``. Asking ``_launch`` itself, rather
    than restating its rules, keeps the classes exact when those rules change."""
    from .kernels.matmul import _launch
    return (r % 16, r == 1) + tuple(
        repr(_launch(*(r if x == probe else x for x in a[:3]), *a[3:])[1]) for a in problems)


def representative_rows(rows, probe: int, problems):
    """The smallest row count of each :func:`row_class`. Recording these instead of every count
    keeps the check's memory that of the smallest step of each class."""
    reps = {}
    for r in sorted({int(x) for x in rows}):
        reps.setdefault(row_class(r, probe, problems), r)
    return sorted(reps.values())


def launch_problem(arch: int, limit: int, dtype: torch.dtype, shapes: Dict,
                   device="cpu") -> Optional[str]:
    """:func:`fused_launch_problem` for compute capability ``arch`` allowing ``limit`` bytes of
    shared memory per block; the step is recorded with tensors on ``device`` (needs the real
    ``triton.jit``, not the interpreter)."""
    records = {}
    head = (shapes["width"], shapes["depth"], shapes["token_dim"])
    # the condition widths a run may have (the teacher's feature size, one per token count):
    # they shape only cond_embed's GEMMs, which do not depend on the rows, so each extra width
    # is recorded once, at the smallest row count
    zs = shapes.get("z", 256)
    zs = sorted({int(x) for x in (zs if isinstance(zs, (list, tuple)) else [zs])})
    try:
        probe, problems = step_gemm_problems(arch, dtype, *head, z=zs[0], device=device,
                                             limit=limit, images=shapes.get("images"))
        reps = representative_rows(shapes["rows"], probe, problems)
        steps = [(r, zs[0]) for r in reps] + [(reps[0], z) for z in zs[1:]]
        for rows, z in steps:
            for rec in record_step(arch, dtype, int(rows), shapes["width"], shapes["depth"],
                                   shapes["token_dim"], z=z, device=device, limit=limit,
                                   images=shapes.get("images")):
                records.setdefault(rec.key(arch), rec)
    except RuntimeError as e:  # no launch configuration fits this device at all
        return str(e)
    for rec in records.values():
        res = compile_launch(rec, arch, registers=False)
        what = f"kernel {rec.kernel} ({rec.call}, {rec.num_warps} warps, {rec.num_stages} stages)"
        if "error" in res:
            return f"{what} does not compile for sm_{arch}: {res['error']}"
        if res["shared"] > limit:
            return (f"{what} needs {res['shared']} B of shared memory per block; sm_{arch} "
                    f"here allows {limit} B")
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(map(str, SUPPORTED_ARCHS)))
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--shapes", default="cifar,r34,r50")
    ap.add_argument("--combos", default=None,
                    help="arch:dtype:shape,... instead of the full product of the three lists")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    os.environ.setdefault("GENDD_FAST_POISON", "0")
    if args.combos:
        combos = [(int(a), d, s) for a, d, s in (c.split(":") for c in args.combos.split(","))]
    else:
        combos = [(int(a), d, s) for a in args.archs.split(",") for d in args.dtypes.split(",")
                  for s in args.shapes.split(",")]
    summary = run_matrix(combos, use_cache=not args.no_cache, jobs=args.jobs,
                         log=lambda s: print(s, file=sys.stderr))
    text = json.dumps(summary, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    else:
        print(text)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
