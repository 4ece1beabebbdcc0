"""Accuracy tables from trained checkpoints: several runs -> one Markdown/CSV table, and the
accuracy-vs-sampling-steps sweep.

    python -m gendd_fast.evaluate --checkpoint runs/*/best.pt --table results.md --csv results.csv
    python -m gendd_fast.evaluate --checkpoint runs/gendd/best.pt --steps-sweep --table steps.md

Runs of one recipe (same config but for the seed and the output folder) are one row: mean +- std
(sample standard deviation) over the seeds. Columns: sampling top-1/top-5 (GenDD: the teacher's
classifier on generated features) and the student's own classifier (GenDD: its linear probe;
the baselines: their prediction). ``--steps-sweep`` evaluates each checkpoint with ancestral
(DDPM) sampling at 100/64/32/16 respaced steps and DDIM at 50/25/10/5, with the seconds each
took: how few steps GenDD needs.

Every evaluation starts from the generator state ``python -m gendd_fast.evaluate --checkpoint
PATH --seed S`` samples from, so a number here equals what that prints for the same settings.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .distill import method
from .evaluate import add_evaluation_options, describe_sampling, evaluation_overrides

DDPM_STEPS = (100, 64, 32, 16)
DDIM_STEPS = (50, 25, 10, 5)
# Config fields that do not make two runs different recipes.
# The fields outside a recipe (seed, device and what does not change the run): Config declares
# them (config.option's ``recipe``), so a new field lands on the right side by itself.
from .config import NOT_RECIPE  # noqa: E402
METRICS = ("sample_top1", "sample_top5", "top1", "top5")


def wants_report(argv: Sequence[str]) -> bool:
    """True when ``python -m gendd_fast.evaluate`` was asked for a table: several checkpoints,
    ``--steps-sweep``, ``--table`` or ``--csv``."""
    argv = list(argv)
    if any(a in ("--steps-sweep", "--table", "--csv", "-h", "--help")
           or a.startswith(("--table=", "--csv=")) for a in argv):
        return True
    n, counting = 0, False
    for a in argv:
        if a == "--checkpoint":
            counting = True
            continue
        if a.startswith("-"):
            counting = False
        elif counting:
            n += 1
    return n > 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gendd_fast.evaluate",
        description="Evaluate trained checkpoints: linear-probe top-1/top-5 and, for GenDD, "
                    "top-1/top-5 by sampling. One checkpoint prints its metrics; several (or "
                    "--table/--csv/--steps-sweep) give one table, runs of one recipe as mean "
                    "+- std over seeds, optionally with the accuracy-vs-sampling-steps sweep.")
    p.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                   help="checkpoints written by the trainer (repeatable)")
    p.add_argument("--table", default=None, help="write the Markdown table here")
    p.add_argument("--csv", default=None, help="write the per-run and per-recipe CSV here")
    p.add_argument("--json", default=None, help="write every result as JSON here")
    p.add_argument("--steps-sweep", action="store_true",
                   help="also evaluate DDPM 100/64/32/16 and DDIM 50/25/10/5 sampling steps")
    p.add_argument("--sweep-ddpm", type=int, nargs="*", default=list(DDPM_STEPS),
                   help="respaced ancestral steps of the sweep")
    p.add_argument("--sweep-ddim", type=int, nargs="*", default=list(DDIM_STEPS),
                   help="DDIM steps of the sweep")
    add_evaluation_options(p)
    return p


# ---------------------------------------------------------------------------------------------
# Evaluating one checkpoint
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    cfg: Any
    distiller: Any
    loaders: Any
    env: Any
    saved: Dict      # the config stored in the checkpoint
    rng: Any         # (torch CPU, CUDA or None) generator states evaluation starts from
    noise_seed: int = 0  # keys the sampling noise with (image index, draw)


def load_run(path: str, overrides: Dict, device_pref: str, seed: Optional[int]) -> Run:
    """A trainer checkpoint rebuilt in the order evaluate uses (seed, data, model, weights),
    so results match ``python -m gendd_fast.evaluate``."""
    from .checkpoint import config_from_checkpoint, read_checkpoint
    from .evaluate import rebuild_for_evaluation

    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, path)
    seed = cfg.seed if seed is None else seed  # the run's own: matches its trainer's number
    try:
        cfg, env, loaders, distiller = rebuild_for_evaluation(ckpt, cfg, overrides,
                                                              device_pref, seed)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # The generator state evaluate would sample from: every setting of a sweep starts from it.
    rng = (torch.get_rng_state(),
           torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None)
    return Run(cfg, distiller, loaders, env, ckpt.get("config", {}), rng, seed)


def _evaluate(run: Run, cfg, sample: bool):
    from .build import configure_sampler, sampling_kwargs
    from .evaluate import evaluate
    from .precision import resolve_amp
    configure_sampler(run.distiller, cfg)
    torch.set_rng_state(run.rng[0])
    if run.rng[1] is not None:
        torch.cuda.set_rng_state(run.rng[1], run.env.device)
    device = run.env.device
    t0 = time.perf_counter()
    res = evaluate(run.distiller, run.loaders.val, device, resolve_amp(cfg.amp, device),
                   sample=sample, sample_kw=sampling_kwargs(cfg), noise_seed=run.noise_seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res["seconds"] = time.perf_counter() - t0
    return res


def recipe_key(config: Dict) -> str:
    """Runs with equal keys are seeds of one recipe."""
    items = sorted((k, repr(v)) for k, v in config.items() if k not in NOT_RECIPE)
    return "|".join(f"{k}={v}" for k, v in items)


def pair_name(config: Dict) -> str:
    t = config.get("teacher")
    return f"{t} -> {config.get('student')}" if t else str(config.get("student"))


def evaluate_checkpoints(paths: Sequence[str], overrides: Dict, device: str = "auto",
                         seed: Optional[int] = None, sample: bool = True,
                         sweep: Optional[Dict] = None):
    """One result dict per checkpoint; with ``sweep`` ({'ddpm': [...], 'ddim': [...]}), a list
    of per-setting results under 'sweep' for GenDD checkpoints."""
    from .build import sampling_kwargs
    runs = []
    for path in paths:
        run = load_run(path, overrides, device, seed)
        cfg = run.cfg
        gendd = method(cfg.method).samples
        do_sample = sample and gendd
        res = _evaluate(run, cfg, do_sample)
        res.update(checkpoint=path, method=cfg.method, pair=pair_name(run.saved),
                   dataset=cfg.dataset, seed=cfg.seed, recipe=recipe_key(run.saved),
                   sampler=(f"ddim{cfg.ddim_steps}" if cfg.ddim_steps else
                            f"ddpm{cfg.sampling_steps}") if do_sample else "",
                   sampling=describe_sampling(sampling_kwargs(cfg),
                                              cfg.ddim_steps or cfg.sampling_steps,
                                              cfg.num_sampling) if do_sample else "")
        if sweep and gendd:
            res["sweep"] = steps_sweep(run, sweep)
        runs.append(res)
    return runs


def steps_sweep(run: Run, sweep: Dict) -> List[Dict]:
    cfg, out = run.cfg, []
    settings = [("ddpm", s) for s in sweep.get("ddpm", ())] + \
        [("ddim", s) for s in sweep.get("ddim", ())]
    for kind, steps in settings:
        c = dataclasses.replace(cfg, sampling_steps=str(steps), ddim_steps=None) \
            if kind == "ddpm" else dataclasses.replace(cfg, ddim_steps=int(steps))
        res = _evaluate(run, c, True)
        out.append(dict(sampler=kind, steps=int(steps), sample_top1=res["sample_top1"],
                        sample_top5=res["sample_top5"], seconds=res["seconds"],
                        images_per_s=res["n"] / max(res["seconds"], 1e-9), n=res["n"]))
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group_runs(runs: Sequence[Dict]) -> List[Dict]:
    """One row per recipe, in order of first appearance: mean and std of every metric."""
    groups: Dict[str, List[Dict]] = {}
    for r in runs:
        groups.setdefault(r["recipe"], []).append(r)
    rows = []
    for members in groups.values():
        first = members[0]
        row = dict(method=first["method"], pair=first["pair"], dataset=first["dataset"],
                   runs=len(members), seeds=[m["seed"] for m in members],
                   checkpoints=[m["checkpoint"] for m in members], sampler=first["sampler"],
                   sampling=first.get("sampling", ""))
        for k in METRICS:
            row[k], row[k + "_std"] = mean_std([m.get(k) for m in members])
        rows.append(row)
    return rows


def _cell(mean, std, runs):
    if mean is None:
        return "-"
    return f"{mean:.2f} +- {std:.2f}" if runs > 1 else f"{mean:.2f}"


def markdown_table(rows: Sequence[Dict]) -> str:
    head = ("| method | teacher -> student | dataset | runs | top-1 sampling | top-5 sampling "
            "| top-1 linear / own | top-5 linear / own | sampling |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cells = [_cell(r[k], r[k + "_std"], r["runs"]) for k in METRICS]
        lines.append(f"| {r['method']} | {r['pair']} | {r['dataset']} | {r['runs']} | "
                     + " | ".join(cells) + f" | {r.get('sampling') or '-'} |")
    return "\n".join(lines) + "\n"


def sweep_table(runs: Sequence[Dict]) -> str:
    lines = ["| checkpoint | sampler | steps | top-1 sampling | top-5 sampling | seconds | "
             "images/s |", "|" + "---|" * 7]
    for r in runs:
        for s in r.get("sweep", []):
            lines.append(f"| {r['checkpoint']} | {s['sampler'].upper()} | {s['steps']} | "
                         f"{s['sample_top1']:.2f} | {s['sample_top5']:.2f} | "
                         f"{s['seconds']:.2f} | {s['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def write_csv(path: str, runs: Sequence[Dict], rows: Sequence[Dict]):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "method", "pair", "dataset", "runs", "seed", "checkpoint",
                    "sampler", "steps", *METRICS, *(m + "_std" for m in METRICS), "seconds"])
        for r in rows:
            w.writerow(["recipe", r["method"], r["pair"], r["dataset"], r["runs"],
                        " ".join(map(str, r["seeds"])), " ".join(r["checkpoints"]),
                        r["sampler"], "", *(r[m] for m in METRICS),
                        *(r[m + "_std"] for m in METRICS), ""])
        for r in runs:
            w.writerow(["run", r["method"], r["pair"], r["dataset"], 1, r["seed"],
                        r["checkpoint"], r["sampler"], "", *(r.get(m) for m in METRICS),
                        *([""] * len(METRICS)), r["seconds"]])
            for s in r.get("sweep", []):
                w.writerow(["sweep", r["method"], r["pair"], r["dataset"], 1, r["seed"],
                            r["checkpoint"], s["sampler"], s["steps"], s["sample_top1"],
                            s["sample_top5"], "", "", *([""] * len(METRICS)), s["seconds"]])


def main(argv=None):
    args = build_parser().parse_args(argv)
    over = evaluation_overrides(args)
    sweep = {"ddpm": args.sweep_ddpm, "ddim": args.sweep_ddim} if args.steps_sweep else None
    runs = evaluate_checkpoints(args.checkpoint, over, args.device, args.seed,
                                sample=not args.no_sample, sweep=sweep)
    rows = group_runs(runs)
    text = markdown_table(rows)
    if sweep:
        text += "\nAccuracy vs sampling steps\n\n" + sweep_table(runs)
    print(text, end="")
    if args.table:
        with open(args.table, "w") as fh:
            fh.write(text)
    if args.csv:
        write_csv(args.csv, runs, rows)
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump({"runs": runs, "recipes": rows}, fh, indent=2)
    return {"runs": runs, "recipes": rows}


if __name__ == "__main__":  # pragma: no cover - the entry point is gendd_fast.evaluate
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
