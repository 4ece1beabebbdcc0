"""The embedded default: where distillation pays, on data that ships in a package.

scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), resized to 16x16 and split
80/20 (stratified, fixed seed) into training and test images. A teacher (wrn_16_2) is trained
once with CE on *all* the labelled training images. Then, for each of three seeds, a small
student (resnet8) is trained in two settings:

- **label-scarce**: the student sees the labels of only 10% of the training images
  (``--labeled-fraction 0.1``, stratified, drawn by the seed). Scratch (CE) trains on that
  labelled tenth alone; KD and DKD also learn from the unlabelled rest through the teacher's
  logits; GenDD (stage 1 on the labelled tenth, then stage 2) learns from every image through its
  diffusion loss, with distribution contraction and CE on the labelled ones only.
- **label-free**: no labels at all (``--labels false``): the KL baseline (``--method kd``, the
  teacher's soft targets only) against GenDD (no contraction, no CE, no stage 1).

GenDD is reported, as in the paper, by its *sampling* accuracy (generated teacher features through
the teacher's classifier); the label-scarce GenDD's linear probe (its own classifier, trained on
detached features) is beside it. The other students are scored by their own classifier. Every row
is mean +- std over the seeds (std with n-1); a row "beats" its baseline (scratch; for label-free
GenDD, label-free KL) only when its mean is higher by more than the larger of the two stds. The
GenDD students of the label-scarce setting are then sampled again with DDPM 100/64/32/16 and DDIM
50/25/10/5 steps: accuracy and milliseconds per image against the number of steps.

Settings were chosen with ``--split val`` (a stratified fifth of the training images carved out
as the evaluation set, the test images untouched); the no-argument run reports the test split.
Every stage is a plain :func:`gendd_fast.train.train` call with a config you could also pass on
the command line; its command and its own output go to ``<stage>/stage.log``, while the terminal
shows one line per stage with an estimate of the time left.

    python -m gendd_fast.train                           # the demo, test split
    python -m gendd_fast.demo --split val --epochs-scale 2   # choosing settings / plateau check
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from .config import make_config

TEACHER, STUDENT = "wrn_16_2", "resnet8"
SEEDS = (0, 1, 2)
IMAGE_SIZE = 16          # the digits are 8x8: 16 px keeps every pixel at a quarter of 32 px's cost
LABELED_FRACTION = 0.1
VAL_FRACTION = 0.2       # --split val: the part of the training images evaluated on
TEACHER_EPOCHS, TEACHER_LR = 10, 2e-3
# Epochs per student (chosen on the validation split, README "Quick start"). Scratch and GenDD's
# stage 1 train on the labelled tenth only (2 steps per epoch), hence their larger epoch counts.
EPOCHS = {"scratch": 60, "kd": 8, "dkd": 8, "gendd-stage1": 20, "gendd": 15,
          "kd-free": 8, "gendd-free": 15}
STUDENT_LR = 1e-2        # scratch, KD, DKD, and GenDD's stage 1 (+3.6 sampling top-1 on val)
GENDD_LR = 2e-3          # GenDD's stage 2: at 1e-2 its sampling accuracy collapsed (old sweep)
# GenDD head for this task: width 256 (128 lost accuracy in the sweep), mul 4 (cheaper steps).
GENDD_HEAD = dict(token_dim=64, diffloss_w=256, diffloss_d=3, mul=4, cond_drop=0.2, beta=1.0,
                  smooth=0.9, cfg=2.0, head="auto")
SWEEP = {"ddpm": [100, 64, 32, 16], "ddim": [50, 25, 10, 5]}
# (key, group, table label), in table order.
ROWS = (("teacher", "all labels", "teacher ({teacher}, CE)"),
        ("scratch", "label-scarce", "from scratch (CE, labelled images only)"),
        ("kd", "label-scarce", "+ KD"),
        ("dkd", "label-scarce", "+ DKD"),
        ("gendd", "label-scarce", "+ GenDD (sampling)"),
        ("kd-free", "label-free", "KL (--method kd --labels false)"),
        ("gendd-free", "label-free", "GenDD (sampling, --labels false)"))
BASELINE = {"kd": "scratch", "dkd": "scratch", "gendd": "scratch", "gendd-free": "kd-free"}
SAMPLED = ("gendd", "gendd-free")
# Relative CPU cost of one step of each method with the teacher forward (the stages' CPU
# seconds of a default run, 16 px, one thread; unit: a CE step of scratch, about 54 ms), for the
# ETA only; a step of the teacher's own training costs about 3 CE steps.
STEP_COST = {"ce": 1.0, "kd": 1.75, "dkd": 1.8, "gendd-pretrain": 0.9, "gendd": 3.2}
TEACHER_STEP_COST = 3.0
TEACHER_FORWARD_COST = 1.0  # of 64 images; saved by --teacher-cache, paid once per variant
SAMPLE_STEP_COST = 0.0024   # one sampling step of one image (the steps sweep)


# -- configurations ----------------------------------------------------------------------------
def common_settings(epochs: int, seed: int, lr: float, image_size: int = IMAGE_SIZE,
                    split: str = "test") -> Dict:
    val = {"val_from_train": VAL_FRACTION} if split == "val" else {}
    return dict(dataset="digits", image_size=image_size, **val, batch_size=64, lr=lr,
                weight_decay=5e-4, opt="adamw", betas=[0.9, 0.95], warmup_epochs=1,
                sched="cos", epochs=epochs, workers=0, seed=seed, log_interval=50, plot=False,
                progress=False, eval_every=epochs)


def teacher_stage(output: str, teacher: str = TEACHER, epochs: int = TEACHER_EPOCHS,
                  image_size: int = IMAGE_SIZE, split: str = "test") -> Dict:
    return dict(name="teacher", output=os.path.join(output, "teacher"),
                **common_settings(epochs, 0, TEACHER_LR, image_size, split), method="ce",
                student=teacher)


def teacher_cache_stage(student_fields: Dict, path: str) -> Dict:
    """Building the teacher cache ahead of the students: the flags of a student that reads it
    (``python -m gendd_fast.teacher_cache`` takes the train flags)."""
    fields = {k: v for k, v in student_fields.items() if k not in ("name", "output")}
    return dict(fields, name="teacher-cache", teacher_cache=path,
                output=os.path.dirname(path) or ".")


def scaled(epochs: Dict[str, int], scale: float) -> Dict[str, int]:
    return {k: max(1, int(round(v * scale))) for k, v in epochs.items()}


def student_stages(output: str, seed: int, teacher: str = TEACHER, student: str = STUDENT,
                   epochs: Optional[Dict[str, int]] = None, sampling_steps: str = "64",
                   gendd: Optional[Dict] = None, image_size: int = IMAGE_SIZE,
                   teacher_checkpoint: Optional[str] = None, split: str = "test",
                   labeled_fraction: float = LABELED_FRACTION,
                   teacher_cache: Optional[str] = None) -> List[Dict]:
    """The students of one seed, in order (GenDD's stage 1 before its stage 2). With
    ``teacher_cache`` the students that run the teacher every step look its outputs up there
    instead (``--teacher-cache``: the same outputs, computed once per augmented image)."""
    ep = {**EPOCHS, **(epochs or {})}
    base = os.path.join(output, f"seed{seed}")
    pretrain = dict(teacher=teacher, teacher_checkpoint=teacher_checkpoint
                    or os.path.join(output, "teacher", "last.pt"))
    tch = {**pretrain, **({"teacher_cache": teacher_cache} if teacher_cache else {})}
    head = {**GENDD_HEAD, **(gendd or {}), "sampling_steps": sampling_steps}
    scarce = {"labeled_fraction": labeled_fraction}

    def stage(name, lr, **kw):
        return dict(name=name, output=os.path.join(base, name),
                    **{**common_settings(ep[name], seed, lr, image_size, split),
                       "student": student, **kw})
    return [
        stage("scratch", STUDENT_LR, method="ce", **scarce),
        stage("kd", STUDENT_LR, method="kd", **scarce, **tch),
        stage("dkd", STUDENT_LR, method="dkd", dkd_warmup=1, **scarce, **tch),
        stage("gendd-stage1", STUDENT_LR, method="gendd-pretrain", **scarce, **pretrain),
        stage("gendd", GENDD_LR, method="gendd", **scarce, **tch, **head,
              init=os.path.join(base, "gendd-stage1", "last.pt")),
        stage("kd-free", STUDENT_LR, method="kd", labels=False, **tch),
        stage("gendd-free", GENDD_LR, method="gendd", labels=False, **tch,
              **{**head, "smooth": 0.0}),
    ]


def command_line(fields: Dict) -> str:
    """The equivalent command for one stage (so a user can rerun or vary it)."""
    parts = []
    for k, v in fields.items():
        if k in ("name", "plot", "progress"):
            continue
        v = " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        v = str(v).lower() if isinstance(v, bool) else v
        parts.append(f"--{k.replace('_', '-')} {v}")
    entry = "teacher_cache" if fields.get("name") == "teacher-cache" else "train"
    return f"python -m gendd_fast.{entry} " + " ".join(parts)


# -- reading results -----------------------------------------------------------------------------
def metric(res: Dict, key: str) -> Optional[float]:
    """``res[key]``, or its final-epoch variant if the trainer names it so (``key_last`` /
    ``last_key``); None when the run did not report it. The demo reports final-epoch numbers, not
    the best over epochs: choosing by held-out accuracy would flatter every row."""
    for k in (key, f"{key}_last", f"last_{key}"):
        v = res.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def mean_std(values: Sequence[float]):
    """(mean, sample std with n-1; 0 for a single value). Empty -> (None, None)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def summarize(per_seed: Dict[str, List[Dict]], teacher: Dict) -> List[Dict]:
    """Table rows from per-seed results: mean/std of the headline top-1 (GenDD: sampling) and the
    label-scarce GenDD's linear probe; ``beats`` when the mean is above the baseline's by more
    than the larger of the two stds (None for rows without a baseline)."""
    rows = [dict(key="teacher", headline=mean_std([metric(teacher, "top1")]),
                 values=[metric(teacher, "top1")], probe=(None, None), n=1)]
    for key, _, _ in ROWS[1:]:
        runs = per_seed.get(key, [])
        if not runs:
            continue
        head_key = "sample_top1" if key in SAMPLED else "top1"
        values = [metric(r, head_key) for r in runs]
        # unsupervised GenDD's own classifier is never trained: no probe to report
        probe = mean_std([metric(r, "top1") for r in runs]) if key == "gendd" else (None, None)
        rows.append(dict(key=key, headline=mean_std(values), values=values, probe=probe,
                         n=len(runs)))
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        r["beats"], r["gap"], r["margin"] = None, None, None
        base = by_key.get(BASELINE.get(r["key"], ""))
        if base is None or r["headline"][0] is None or base["headline"][0] is None:
            continue
        r["gap"] = r["headline"][0] - base["headline"][0]
        r["margin"] = max(r["headline"][1], base["headline"][1])
        r["beats"] = r["gap"] > r["margin"]
    return rows


# -- presenting them -----------------------------------------------------------------------------
def fmt_ms(ms) -> str:
    m, s = ms
    if m is None:
        return "-"
    return f"{m:.2f}" if s is None else f"{m:.2f} +- {s:.2f}"


def row_label(key: str, teacher: str = TEACHER, student: str = STUDENT) -> str:
    label = {k: lab for k, _, lab in ROWS}[key]
    if key == "teacher":
        return label.format(teacher=teacher)
    return f"student ({student}) {label}"


def _markdown(cols, body) -> str:
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]

    def line(cells):  # text columns left-aligned, numbers right-aligned
        return "| " + " | ".join((c.ljust(w) if i < 2 else c.rjust(w))
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(b) for b in body])


def format_table(rows: List[Dict], teacher: str = TEACHER, student: str = STUDENT) -> str:
    cols = ("setting", "model", "top-1", "scored by", "GenDD linear probe", "vs baseline")
    groups = {k: g for k, g, _ in ROWS}
    body = []
    for r in rows:
        key = r["key"]
        vs = ""
        if r["gap"] is not None:
            verdict = "beats" if r["beats"] else ("below" if -r["gap"] > r["margin"]
                                                  else "within std")
            vs = f"{r['gap']:+.2f} vs {BASELINE[key]}: {verdict}"
        how = "sampling" if key in SAMPLED else "own classifier"
        body.append((groups[key], row_label(key, teacher, student), fmt_ms(r["headline"]), how,
                     fmt_ms(r["probe"]), vs))
    return _markdown(cols, body)


def format_sweep(sweep_rows: List[Dict]) -> str:
    cols = ("sampler", "steps", "sampling top-1", "ms per image", "linear probe (same models)")
    body = [(s["sampler"].upper(), str(s["steps"]), fmt_ms(s["top1"]), fmt_ms(s["ms"]),
             fmt_ms(s["probe"])) for s in sweep_rows]
    return _markdown(cols, body)


def plot_comparison(rows: List[Dict], path: str, title: str, teacher: str = TEACHER,
                    student: str = STUDENT) -> Optional[str]:
    """Every row as its per-seed points with the mean and a +-std error bar, on a top-1 axis
    with a grid line every point (so a 1-point gap is visible). None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MultipleLocator
    except Exception:  # noqa: BLE001 - a missing/broken matplotlib only costs the figure
        return None
    shown = [r for r in rows if r["headline"][0] is not None]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(shown) + 1.6))
    lo, hi = 100.0, 0.0
    for i, r in enumerate(shown):
        y = len(shown) - 1 - i
        vals = [v for v in r["values"] if v is not None]
        m, s = r["headline"]
        colour = "0.4" if r["key"] == "teacher" else ("tab:green" if r["beats"] else "tab:blue")
        ax.errorbar([m], [y], xerr=[s or 0.0], fmt="D", color=colour, capsize=5, markersize=7,
                    zorder=3)
        ax.scatter(vals, [y + 0.18] * len(vals), s=18, color="black", zorder=4,
                   label="one seed" if i == 0 else None)
        lo, hi = min(lo, m - (s or 0), *vals), max(hi, m + (s or 0), *vals)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([row_label(r["key"], teacher, student).replace(f"student ({student}) ", "")
                        for r in reversed(shown)], fontsize=8)
    ax.set_xlim(max(0.0, math.floor(lo) - 1), min(100.5, math.ceil(hi) + 1))
    ax.xaxis.set_minor_locator(MultipleLocator(1))
    ax.xaxis.set_major_locator(MultipleLocator(5 if hi - lo > 20 else 2))
    ax.grid(axis="x", which="minor", color="0.9", linewidth=0.6)
    ax.grid(axis="x", which="major", color="0.75", linewidth=0.8)
    ax.set_xlabel("test top-1 (%): diamond = mean +- std over seeds, dots = seeds; grid = 1 point")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- what the run was measured on ---------------------------------------------------------------
def environment() -> Dict:
    """Host, threads, versions and commit: the table depends on the thread count."""
    import numpy
    import torch
    from . import __version__ as version
    info = {"host": platform.node(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "gendd_fast": version, "commit": None}
    for mod in ("sklearn", "PIL", "matplotlib"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is recorded as missing
            info[mod] = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            info["commit"] = out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# -- the driver ----------------------------------------------------------------------------------
def trained_teacher_metrics(teacher_dir: str) -> Dict:
    """Held-out accuracy of a teacher the demo trained before, from the last evaluation in its
    ``metrics.jsonl`` (plain JSON: nothing is unpickled)."""
    path = os.path.join(teacher_dir, "metrics.jsonl")
    if not os.path.isfile(os.path.join(teacher_dir, "last.pt")) or not os.path.isfile(path):
        raise FileNotFoundError(f"no trained teacher in {teacher_dir!r} (need last.pt and "
                                f"metrics.jsonl from a demo teacher run)")
    val = None
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line) if line.strip() else {}
            if rec.get("type") == "val":
                val = rec
    if val is None:
        raise ValueError(f"{path}: the teacher run recorded no held-out evaluation")
    return {k: val.get(k) for k in ("top1", "top5")}


def run_logged(fields: Dict, train_fn) -> Dict:
    """One stage: its command line and all its own output go to ``<output>/stage.log``; the
    result carries the stage's CPU seconds as ``cpu_s``. The teacher-cache stage builds the
    cache file (``python -m gendd_fast.teacher_cache``) instead of training."""
    os.makedirs(fields["output"], exist_ok=True)
    values = {k: v for k, v in fields.items() if k != "name"}
    # overwrite: rerunning the demo replaces its own earlier runs (a fresh run into a folder
    # holding a checkpoint is refused otherwise)
    cfg = make_config(**{**values, "overwrite": True})
    building = fields["name"] == "teacher-cache"
    c = time.process_time()
    with open(os.path.join(fields["output"], "stage.log"), "w") as fh, \
            contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        print(command_line(fields), flush=True)
        if building:
            from .teacher_cache import build_file
            res = build_file(cfg, replace=True)  # the demo's own file: a new teacher rebuilds it
        else:
            res = dict(train_fn(cfg))
    res["cpu_s"] = round(time.process_time() - c, 1)
    return res


def run_task(steps, train_fn=None, one_thread: bool = True) -> List[Dict]:
    """A unit of work for one worker: its steps in order, each ("stage", fields) (train, or build
    the teacher cache) or ("sweep", (checkpoint, sweep, log)). One torch thread per worker: each
    stage then computes the same numbers whatever the machine's core count. Stops after a stage
    that a signal interrupted."""
    if one_thread:
        import torch
        torch.set_num_threads(1)
    out = []
    for kind, payload in steps:
        if kind == "sweep":
            from .report import evaluate_checkpoints
            ckpt, sweep, log = payload
            c = time.process_time()
            with open(log, "w") as fh, contextlib.redirect_stdout(fh), \
                    contextlib.redirect_stderr(fh):
                res = evaluate_checkpoints([ckpt], {}, "auto", seed=0, sample=True,
                                           sweep=sweep)[0]
            out.append(dict(res, cpu_s=round(time.process_time() - c, 1)))
            continue
        if train_fn is None:
            from .train import train as train_fn
        res = run_logged(payload, train_fn)
        out.append(res)
        if res.get("stopped_by_signal") is not None:
            break  # train() turned a SIGTERM into a clean return: do not start the next stage
    return out


class Progress:
    """The terminal's view: "stage k of N" as each finishes, with an estimate of the time left
    from the seconds per unit of estimated cost (steps x relative step cost) so far."""

    def __init__(self, steps: List, out=None, workers: int = 1):
        self.n, self.out, self.workers = len(steps), out or sys.stdout, max(1, workers)
        self.total = sum(self.cost(k, p) for k, p in steps)
        self.k, self.done_cost, self.done_cpu, self.t0 = 0, 0.0, 0.0, time.time()

    @staticmethod
    def estimate(fields: Dict) -> float:
        images = 1438 * (1 - fields.get("val_from_train", 0.0))
        if fields["name"] == "teacher-cache":  # one teacher forward per augmented image
            return images * 25 / 64 * TEACHER_FORWARD_COST
        if fields["method"] in ("ce", "gendd-pretrain") and fields.get("labeled_fraction", 1) < 1:
            images *= fields["labeled_fraction"]
        steps = max(1, int(images) // fields["batch_size"]) * fields["epochs"]
        if fields.get("student") == TEACHER:
            return steps * TEACHER_STEP_COST
        cost = STEP_COST.get(fields["method"], 3.0)
        return steps * (cost - TEACHER_FORWARD_COST if fields.get("teacher_cache") else cost)

    @staticmethod
    def sweep_cost(payload) -> float:
        _, sweep, _ = payload
        return 360 * sum(sum(v) for v in sweep.values()) * SAMPLE_STEP_COST

    @staticmethod
    def cost(kind: str, payload) -> float:
        return Progress.estimate(payload) if kind == "stage" else Progress.sweep_cost(payload)

    def done(self, payload, cpu_s: float, kind: str = "stage"):
        self.k += 1
        self.done_cost += self.cost(kind, payload)
        self.done_cpu += cpu_s
        # CPU seconds per unit of cost so far, shared by the workers: stages still running on
        # other workers do not skew it, as a wall-clock rate would early on
        left = self.done_cpu / self.done_cost * (self.total - self.done_cost) / self.workers
        if kind == "stage":
            where = payload["output"]
        else:
            where = os.path.join(os.path.dirname(payload[0]), "steps sweep")
        where = os.path.relpath(where) if not os.path.isabs(where) else where
        print(f"stage {self.k} of {self.n} done: {where} ({cpu_s:.0f} CPU-s)"
              + (f", about {left / 60:.1f} min left" if self.k < self.n else ""),
              file=self.out, flush=True)


class Task:
    """Steps one worker runs in order, after the tasks named in ``after`` have finished."""

    def __init__(self, name: str, steps: List, after: Sequence[str] = ()):
        self.name, self.steps, self.after = name, list(steps), tuple(after)

    def cost(self) -> float:
        return sum(Progress.cost(k, p) for k, p in self.steps)


def _critical_paths(tasks: List[Task]) -> Dict[str, float]:
    """Each task's cost plus the most costly chain of tasks that waits for it: run first, the
    task with the longest path keeps the workers busy to the end (list scheduling)."""
    waiting = {t.name: [u for u in tasks if t.name in u.after] for t in tasks}
    memo: Dict[str, float] = {}

    def path(t: Task) -> float:
        if t.name not in memo:
            memo[t.name] = t.cost() + max((path(u) for u in waiting[t.name]), default=0.0)
        return memo[t.name]
    return {t.name: path(t) for t in tasks}


def _run_all(tasks: List[Task], workers: int, progress: "Progress", train_fn=None
             ) -> Dict[str, List[Dict]]:
    """Run ``tasks`` (each after the ones it waits for) on ``workers`` processes started once
    (0: in this process, in list order, which must put a task after those it waits for) and
    return their results by name, reporting each step as it finishes. A worker that frees up
    takes the ready task with the longest critical path."""
    results: Dict[str, List[Dict]] = {}

    def finished(t: Task, res: List[Dict]):
        results[t.name] = res
        for (kind, payload), r in zip(t.steps, res):
            progress.done(payload, r["cpu_s"], kind)
            if r.get("stopped_by_signal") is not None:
                raise SystemExit(f"demo stopped by signal {r['stopped_by_signal']} during "
                                 f"{payload['name']} (its checkpoint is in "
                                 f"{payload['output']})")
    if workers <= 0:
        for t in tasks:
            finished(t, run_task(t.steps, train_fn, one_thread=False))
        return results
    import concurrent.futures as cf
    import multiprocessing as mp
    rank = _critical_paths(tasks)
    pending = sorted(tasks, key=lambda t: -rank[t.name])
    running: Dict = {}
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                                mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            ready = [t for t in pending if all(a in results for a in t.after)]
            for t in ready[:max(0, workers - len(running))]:
                pending.remove(t)
                running[pool.submit(run_task, t.steps)] = t
            if not running:
                missing = sorted({a for t in pending for a in t.after} - set(results))
                raise RuntimeError(f"demo tasks wait for tasks that never run: {missing}")
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in done:
                finished(running.pop(f), f.result())
    return results


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def run_demo(output: str = os.path.join("runs", "digits-demo"), seeds: Sequence[int] = SEEDS,
             teacher_epochs: int = TEACHER_EPOCHS, epochs: Optional[Dict[str, int]] = None,
             epochs_scale: float = 1.0, sampling_steps: str = "64", teacher: str = TEACHER,
             student: str = STUDENT, image_size: int = IMAGE_SIZE, split: str = "test",
             sweep: Optional[Dict] = None, quiet: bool = False,
             reuse_teacher: Optional[str] = None, workers: Optional[int] = None) -> Dict:
    """Train the teacher once, then every student for each seed; print and save the table, the
    steps table and the figure. Stages run on ``workers`` processes (default: one per core, at
    most 8), one torch thread each, so the numbers do not depend on the core count; ``workers=0``
    runs them in this process with its own threads. The small sizes exist for the tests; the
    defaults are the advertised demo. ``reuse_teacher``: the output folder of an earlier demo's
    teacher, used instead of training one. ``split="val"`` evaluates on training images."""
    if not seeds:
        raise ValueError("run_demo needs at least one seed")
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    workers = default_workers() if workers is None else workers
    # a reused teacher must exist before anything is trained against it
    teacher_res = trained_teacher_metrics(reuse_teacher) if reuse_teacher else None
    train_fn = None
    if workers <= 0:
        from .train import train as train_fn  # the trainer sits above the demo
    ep = scaled({**EPOCHS, **(epochs or {})}, epochs_scale)
    sweep = SWEEP if sweep is None else sweep
    t0, c0 = time.time(), time.process_time()
    teacher_ckpt = os.path.join(reuse_teacher or os.path.join(output, "teacher"), "last.pt")
    cache = os.path.join(output, "teacher-cache", "cache.pt")
    per_seed_stages = {seed: student_stages(output, seed, teacher, student, ep, sampling_steps,
                                            image_size=image_size,
                                            teacher_checkpoint=teacher_ckpt, split=split,
                                            teacher_cache=cache)
                       for seed in seeds}
    sweeping = bool(sweep.get("ddpm") or sweep.get("ddim"))
    # The work as tasks that wait for what they read: the teacher's checkpoint, then its cache
    # (GenDD's stage 1 needs only the checkpoint); one pool of workers runs them all, so no
    # worker waits at a phase boundary. The sweep runs right after each label-scarce GenDD.
    tasks: List[Task] = []
    after_teacher = () if reuse_teacher else ("teacher",)
    if not reuse_teacher:
        tasks.append(Task("teacher", [("stage", teacher_stage(output, teacher, teacher_epochs,
                                                              image_size, split))]))
    first_kd = per_seed_stages[seeds[0]][1]
    tasks.append(Task("teacher-cache", [("stage", teacher_cache_stage(first_kd, cache))],
                      after_teacher))
    for seed, stages in per_seed_stages.items():
        by = {st["name"]: st for st in stages}
        gendd = [("stage", by["gendd"])]
        if sweeping:
            ckpt = os.path.join(by["gendd"]["output"], "last.pt")
            gendd.append(("sweep", (ckpt, sweep, os.path.join(by["gendd"]["output"],
                                                              "steps_sweep.log"))))
        tasks += [Task(f"scratch{seed}", [("stage", by["scratch"])]),
                  Task(f"stage1-{seed}", [("stage", by["gendd-stage1"])], after_teacher),
                  Task(f"gendd{seed}", gendd, ("teacher-cache", f"stage1-{seed}"))]
        tasks += [Task(f"{name}{seed}", [("stage", by[name])], ("teacher-cache",))
                  for name in ("gendd-free", "kd", "dkd", "kd-free")]
    steps = [st for t in tasks for st in t.steps]
    progress = Progress(steps, out=open(os.devnull, "w") if quiet else sys.stdout,
                        workers=min(max(workers, 1), len(tasks)))
    if not quiet:
        print(f"GenDD digits demo: {len(steps)} stages on {max(workers, 1)} worker "
              f"process(es); each stage's output is in its folder's stage.log", flush=True)
    done = _run_all(tasks, workers, progress, train_fn)
    teacher_res = teacher_res or done["teacher"][0]
    per_seed: Dict[str, List[Dict]] = {}
    by_output = {p["output"]: r for t in tasks for (k, p), r in zip(t.steps, done[t.name])
                 if k == "stage"}
    for seed in seeds:  # in seed order, whatever order the workers finished in
        for st in per_seed_stages[seed]:
            res = by_output[st["output"]]
            if st["name"] != "gendd-stage1":
                per_seed.setdefault(st["name"], []).append(
                    {k: metric(res, k) for k in ("top1", "top5", "sample_top1", "sample_top5")})
    cpu_by_stage = {out_dir: res["cpu_s"] for out_dir, res in by_output.items()}
    sweep_rows = []
    if sweeping:
        runs = [done[f"gendd{seed}"][1] for seed in seeds]
        cpu_by_stage.update({os.path.join(per_seed_stages[seed][4]["output"], "steps sweep"):
                             r["cpu_s"] for seed, r in zip(seeds, runs)})
        probe = mean_std([r["top1"] for r in runs])
        for i, s in enumerate(runs[0]["sweep"]):
            per = [r["sweep"][i] for r in runs]
            sweep_rows.append(dict(sampler=s["sampler"], steps=s["steps"],
                                   top1=mean_std([p["sample_top1"] for p in per]),
                                   ms=mean_std([1000.0 * p["seconds"] / p["n"] for p in per]),
                                   probe=probe, per_seed=[p["sample_top1"] for p in per]))
    rows = summarize(per_seed, teacher_res)
    table = format_table(rows, teacher, student)
    steps_table = format_sweep(sweep_rows) if sweep_rows else ""
    wall = round(time.time() - t0, 1)
    split_name = "test" if split == "test" else "validation (carved from the training images)"
    title = (f"digits {image_size}px, {student} students ({int(LABELED_FRACTION * 100)}% labels "
             f"or none), {teacher} teacher; {split_name} top-1, {len(seeds)} seed(s)")
    figure = plot_comparison(rows, os.path.join(output, "comparison.png"), title, teacher, student)
    env = dict(environment(), workers=workers,
               threads_per_stage=1 if workers > 0 else environment()["torch_threads"])
    summary = {"rows": [{**r, "label": row_label(r["key"], teacher, student)} for r in rows],
               "per_seed": per_seed, "seeds": list(seeds), "split": split,
               "teacher": {k: metric(teacher_res, k) for k in ("top1", "top5")},
               "steps_sweep": sweep_rows, "seconds": wall,
               "cpu_seconds_stages": round(sum(cpu_by_stage.values()), 1),
               "cpu_seconds_main": round(time.process_time() - c0, 1),
               "stage_cpu_seconds": cpu_by_stage, "epochs": ep, "teacher_epochs": teacher_epochs,
               "image_size": image_size, "labeled_fraction": LABELED_FRACTION,
               "gendd_head": GENDD_HEAD, "sampling_steps": sampling_steps,
               "environment": env, "reused_teacher": reuse_teacher, "figure": figure,
               "stages": [command_line(p) for k, p in steps if k == "stage"]}
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(output, "results.md"), "w") as fh:
        fh.write(table + "\n" + (f"\n{steps_table}\n" if steps_table else ""))
    print(f"\nDistillation on the embedded digits data: {title} ({wall:.0f}s wall, "
          f"{summary['cpu_seconds_stages']:.0f} CPU-s in the stages, {max(workers, 1)} "
          f"worker(s), {env['threads_per_stage']} thread(s) each)")
    print(table)
    print("Label-scarce: students see labels for 10% of the training images (KD, DKD, GenDD also "
          "learn from the rest through the teacher). Label-free: no labels at all. GenDD is "
          "scored by sampling (generated teacher features through the teacher's classifier), the "
          "others by their own classifier. 'beats': the mean is above the baseline's by more "
          "than the larger std.")
    if steps_table:
        print(f"\nLabel-scarce GenDD: sampling top-1 against sampling steps (CFG 2, one draw, "
              f"mean +- std over {len(seeds)} seed(s); ms per image on one thread)")
        print(steps_table)
    if figure:
        print(f"Figure: {figure}")
    print(f"Results: {os.path.join(output, 'results.json')}; each stage's log: <stage>/stage.log")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gendd_fast.demo", description=__doc__.split(
        "\n")[0])
    p.add_argument("--output", default=None, help="default runs/digits-demo (val: -val)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="val: evaluate on a fifth of the training images (choosing settings)")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every student's epochs (the plateau check uses 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--reuse-teacher", default=None, help="an earlier demo's teacher folder")
    p.add_argument("--no-sweep", action="store_true", help="skip the sampling-steps sweep")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one thread each (default: one per core, at most 8; "
                        "0: run the stages in this process)")
    a = p.parse_args(argv)
    out = a.output or os.path.join("runs", "digits-demo" + ("-val" if a.split == "val" else ""))
    return run_demo(output=out, seeds=a.seeds, epochs_scale=a.epochs_scale, split=a.split,
                    reuse_teacher=a.reuse_teacher, sweep={} if a.no_sweep else None,
                    workers=a.workers)


if __name__ == "__main__":
    main()
