"""The trainer's configuration: one dataclass, YAML recipes on top, command-line flags on top of that.

Precedence: dataclass default < ``--config FILE.yaml`` < explicit command-line flags. Every field is
a flag (``token_dim`` -> ``--token-dim``), so a recipe never holds a setting the CLI cannot change.
The resolved config is stored in every checkpoint; resuming compares the fields that define the run
(:data:`RUN_IDENTITY_EXCLUDED` lists those that may change between a run and its resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .distill import method, method_names
from .layout import folder
from .validation import check_number, coerce_value, interval

METHODS = method_names()  # the registry's (gendd_fast/distill/), in registration order
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "filelist", "webdataset", "synthetic")
# configs/ at the top of the repository, mapped into the package by setup.py (layout.py).
CONFIG_DIR = folder("configs")

# --help's groups, in the order they print (each field names its group).
DATA, MODEL, METHOD, HEAD, OPTIM, SPEED, RUN = (
    "data", "model", "method", "GenDD head and sampling", "optimisation", "precision and speed",
    "run and checkpoints")
GROUPS = (DATA, MODEL, METHOD, HEAD, OPTIM, SPEED, RUN)


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo`` (and ``hi``), each closed unless ``*_open``."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def describe(self) -> str:
        if self.hi is None:
            return "positive" if self.lo == 0 and self.lo_open else f"at least {self.lo}"
        return (f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}"
                f"{')' if self.hi_open else ']'}")


def at_least(lo) -> Range:
    return Range(lo)


def positive() -> Range:
    return Range(0, lo_open=True)


def option(default, group: str, *, help: str, choices=None, range: Optional[Range] = None,
        run: bool = True, recipe: Optional[bool] = None, evaluate=False):
    """One Config field, declared once: its default, --help group and text, the values it may
    take (``choices``, a numeric ``range``: validation checks them), whether it belongs to the
    run's identity (``run``: a resume must match it) and to its recipe (``recipe``: the report
    groups seeds of one recipe; default: the same as ``run``), and whether the evaluation
    entries take it as an option (``evaluate``: True, or the flag they spell it as)."""
    meta = dict(help=help, group=group, choices=choices, range=range, run=run,
                recipe=run if recipe is None else recipe, evaluate=evaluate)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- what to train -------------------------------------------------------------------------
    method: str = option("gendd", METHOD, help="training method: " + ", ".join(METHODS))
    student: str = option("resnet8", MODEL, help="student architecture (see --list-models)")
    teacher: Optional[str] = option(None, MODEL, help="teacher architecture (see --list-models)")
    teacher_checkpoint: Optional[str] = option(
        None, MODEL, run=False,
        help="teacher weights: a checkpoint of this trainer or a {'model': state_dict} file")
    init: Optional[str] = option(
        None, MODEL, run=False,
        help="start the student from these weights (stage 2 from stage 1); non-strict")
    teacher_pretrained: bool = option(
        False, MODEL,
        help="with --teacher timm:NAME: timm's pretrained weights and input normalisation "
             "(timm's download and cache); with --teacher-checkpoint FILE, the weights and "
             "class count of that file")
    teacher_weights: Optional[str] = option(
        None, MODEL,
        help="with --teacher torchvision:NAME: a weights name (DEFAULT, IMAGENET1K_V2, ...) or a "
             "local state-dict file")
    # --- data ----------------------------------------------------------------------------------
    dataset: str = option(
        "digits", DATA, choices=DATASETS,
        help="dataset kind: " + ", ".join(DATASETS))
    data_path: Optional[str] = option(
        None, DATA, run=False, evaluate=True,
        help="dataset root (CIFAR pickle folder, ImageFolder root with train/ and val/, or the "
             "base of the file lists)")
    train_list: Optional[str] = option(
        None, DATA, run=False,
        help="'path label' file list of the training images, relative to --data-path "
             "(ImageNet-LT)")
    val_list: Optional[str] = option(
        None, DATA, run=False, evaluate=True,
        help="'path label' file list of the evaluation images")
    val_path: Optional[str] = option(
        None, DATA, run=False, evaluate=True,
        help="separate evaluation root (e.g. ImageNet val for CC3M runs)")
    num_classes: Optional[int] = option(
        None, DATA, range=at_least(2),
        help="number of classes (inferred from the data when not given)")
    image_size: Optional[int] = option(
        None, DATA, range=at_least(1),
        help="training crop size (32 for CIFAR/digits, 224 for ImageNet-style data)")
    val_resize: Optional[int] = option(
        None, DATA, range=at_least(1),
        help="shorter side before the evaluation centre crop (256 for 224)")
    crop_scale: List[float] = option(
        [0.08, 1.0], DATA,
        help="RandomResizedCrop area range LO HI (ImageNet-style data)")
    data_backend: str = option(
        "auto", DATA, choices=("auto", "torch", "dali"), run=False,
        help="data pipeline: dali (GPU JPEG decode), torch (DataLoader), auto (dali on CUDA when "
             "installed)")
    skip_bad_images: bool = option(
        False, DATA, run=False,
        help="skip undecodable images (counted each epoch) instead of stopping")
    synthetic_size: int = option(
        256, DATA, range=at_least(1),
        help="images in the 'synthetic' dataset (tests, benchmarks)")
    labeled_fraction: float = option(
        1.0, DATA, range=Range(0, 1, lo_open=True),
        help="digits/CIFAR/synthetic: keep the labels of this fraction of the training images "
             "(stratified, drawn by --seed); the rest become unlabelled (-1): distillers learn "
             "from them through the teacher, ce and gendd-pretrain drop them")
    val_from_train: float = option(
        0.0, DATA, range=Range(0, 1, hi_open=True),
        help="digits/CIFAR/synthetic: carve this stratified fraction of the training images "
             "(fixed seed) and evaluate on it instead of the test split (for choosing "
             "settings); 0 uses the test split")
    # --- optimisation --------------------------------------------------------------------------
    epochs: int = option(240, OPTIM, range=at_least(1), help="training epochs")
    batch_size: int = option(
        64, OPTIM, range=at_least(1),
        help="images per GPU (per process) per step")
    eval_batch_size: Optional[int] = option(
        None, OPTIM, range=at_least(1), run=False, evaluate="--batch-size",
        help="images per process per evaluation batch")
    opt: str = option("adamw", OPTIM, choices=("adamw", "sgd"), help="optimiser: adamw, sgd")
    opt_impl: str = option(
        "torch", OPTIM, choices=("torch", "apex"), run=False,
        help="optimiser implementation: torch (native fused on CUDA) or apex (FusedAdam when "
             "NVIDIA apex is installed)")
    lr: float = option(1e-3, OPTIM, range=at_least(0), help="peak learning rate")
    weight_decay: float = option(
        0.05, OPTIM, range=at_least(0),
        help="weight decay of the decayed parameter group")
    momentum: float = option(0.9, OPTIM, range=Range(0, 1, hi_open=True), help="SGD momentum")
    betas: List[float] = option(
        [0.9, 0.95], OPTIM,
        help="AdamW betas BETA1 BETA2 (BETA2 is the start of the ramp when --beta2-end is set)")
    beta2_end: Optional[float] = option(
        None, OPTIM, range=Range(0, 1, lo_open=True, hi_open=True),
        help="ramp AdamW beta2 from BETA2 of --betas to this value along a per-step cosine, "
             "reached on the last step (the paper: 0.999); none: constant")
    warmup_epochs: float = option(
        0.0, OPTIM, range=at_least(0),
        help="linear learning-rate warm-up, in epochs")
    sched: str = option(
        "cos", OPTIM, choices=("cos", "cos-epoch", "step"),
        help="learning-rate schedule: cos (per-step cosine to --min-lr), cos-epoch (per-epoch "
             "warm-up and cosine, the paper's ImageNet schedule), step (x --decay-rate at "
             "--decay-epochs)")
    decay_epochs: List[int] = option(
        [150, 180, 210], OPTIM,
        help="epochs at which --sched step multiplies the lr by --decay-rate")
    decay_rate: float = option(0.1, OPTIM, range=at_least(0), help="factor of each step decay")
    min_lr: float = option(
        0.0, OPTIM, range=at_least(0),
        help="learning rate at the end of the cosine")
    clip_grad: Optional[float] = option(
        None, OPTIM, range=positive(),
        help="clip the gradient norm to this value (none: no clipping)")
    # --- GenDD ---------------------------------------------------------------------------------
    token_dim: int = option(
        64, HEAD, range=at_least(1),
        help="token size d: the teacher feature is split into D_t/d tokens (must divide)")
    diffloss_w: int = option(1024, HEAD, range=at_least(1), help="width W of the diffusion head")
    diffloss_d: int = option(
        3, HEAD, range=at_least(1),
        help="residual blocks of the diffusion head")
    mul: Optional[int] = option(
        None, HEAD, range=at_least(1),
        help="diffusion_batch_mul: copies of each token per step (30 CIFAR, 10 ImageNet)")
    cond_drop: float = option(
        0.2, HEAD, range=Range(0, 1, hi_open=True),
        help="probability of dropping the condition (classifier-free guidance training)")
    beta: float = option(
        1.0, METHOD, range=at_least(0),
        help="Beta(beta, beta) mixing of conditions and targets; 0 disables")
    smooth: float = option(
        0.9, METHOD, range=Range(0, 1, hi_open=True),
        help="distribution contraction s: target = (1-s) f_t + s W_t[y]; 0 when unsupervised")
    labels: bool = option(
        True, METHOD,
        help="use labels: false for unsupervised runs (GenDD: no CE, no contraction; kd: the KL "
             "baseline, teacher soft targets only)")
    head: str = option(
        "auto", HEAD, choices=("auto", "fused", "torch"), evaluate=True,
        help="diffusion head: fused (Triton), torch (reference), auto (fused on CUDA)")
    grad_checkpointing: bool = option(
        False, HEAD,
        help="recompute head activations in the backward (saves memory)")
    sampling_steps: str = option(
        "64", HEAD, evaluate=True,
        help="respaced DDPM steps for sampling evaluation, e.g. 100 or 64")
    cfg: float = option(
        2.0, HEAD, range=at_least(0), evaluate=True,
        help="classifier-free guidance scale at sampling")
    temperature: float = option(
        1.0, HEAD, range=positive(), evaluate=True,
        help="noise temperature at sampling")
    num_sampling: int = option(
        1, HEAD, range=at_least(1), run=False, evaluate=True,
        help="draws averaged per image before classifying, in the final evaluation of best.pt and "
             "the last model (the paper: 5); evaluations during training use 1")
    ddim_steps: Optional[int] = option(
        None, HEAD, range=at_least(1), evaluate=True,
        help="sample with DDIM over this many steps instead")
    sample_eval: str = option(
        "end", HEAD, choices=("end", "every", "never"), run=False,
        help="when to evaluate by sampling: every (each evaluation; best.pt is chosen by sampling "
             "top-1, as in the paper), end (best.pt chosen by the linear probe, sampling only in "
             "the final evaluation), never. Unsupervised GenDD always selects by sampling")
    shot_split: str = option(
        "auto", RUN, choices=("auto", "on", "off"), run=False,
        help="also report many/medium/few-shot top-1 (classes with >100, 20-100, <20 training "
             "images): on, off, auto (on for a long-tailed --train-list)")
    # --- baselines -----------------------------------------------------------------------------
    kd_T: float = option(4.0, METHOD, range=positive(), help="KD temperature")
    kd_alpha: float = option(
        0.1, METHOD,
        help="KD: weight of the CE term; (1 - alpha) weights the KL term")
    dkd_alpha: float = option(1.0, METHOD, help="DKD: weight of the target-class term (TCKD)")
    dkd_beta: float = option(8.0, METHOD, help="DKD: weight of the non-target-class term (NCKD)")
    dkd_T: float = option(4.0, METHOD, range=positive(), help="DKD temperature")
    dkd_warmup: int = option(
        20, METHOD, range=at_least(0),
        help="DKD: epochs of linear warm-up of the distillation weight")
    dkd_ce_weight: float = option(1.0, METHOD, help="DKD: weight of the CE term")
    ikl_alpha: float = option(
        1.0, METHOD,
        help="IKL-KD: weight of the soft-label cross-entropy term")
    ikl_beta: float = option(
        0.5, METHOD,
        help="IKL-KD: weight of the weighted MSE on pairwise logit differences")
    ikl_T: float = option(
        1.0, METHOD, range=positive(),
        help="IKL-KD: temperature of the soft-label term")
    ikl_T2: float = option(
        1.0, METHOD, range=positive(),
        help="IKL-KD: temperature of the teacher probabilities that weigh class pairs")
    ikl_gi: bool = option(
        True, METHOD,
        help="IKL-KD: weigh class pairs by the class-wise mean teacher probability (global "
             "information) instead of the sample's own")
    ikl_warmup: float = option(
        1.0, METHOD,
        help="IKL-KD: epochs over which the IKL term ramps up linearly")
    ikl_ce_weight: float = option(1.0, METHOD, help="IKL-KD: weight of the cross-entropy on labels")
    # --- augmentation (BEiT -> ResNet-50 recipes) ----------------------------------------------
    randaug: Optional[str] = option(
        None, DATA,
        help="timm's RandAugment on each training image before normalising (DALI: the same "
             "ops on the GPU), policy rand-mM-nN[-mstdS][-inc1], e.g. rand-m7-n2-mstd0.5; none "
             "disables")
    mixup: float = option(
        0.0, DATA, range=at_least(0),
        help="Mixup alpha (Beta(a, a)) on training batches; labels become soft; 0 disables")
    cutmix: float = option(
        0.0, DATA, range=at_least(0),
        help="CutMix alpha (Beta(a, a)) on training batches; 0 disables")
    mixup_prob: float = option(
        1.0, DATA, range=Range(0, 1),
        help="probability that a training batch is mixed (Mixup or CutMix)")
    mixup_switch_prob: float = option(
        0.5, DATA, range=Range(0, 1),
        help="with --mixup and --cutmix both on: probability of CutMix")
    label_smoothing: float = option(
        0.0, DATA, range=Range(0, 1, hi_open=True),
        help="label smoothing of the training labels (soft labels flow into CE, KD and GenDD's "
             "contraction y @ W_t)")
    # --- performance ---------------------------------------------------------------------------
    amp: str = option(
        "auto", SPEED, choices=("auto", "bf16", "fp16", "off"), evaluate=True,
        help="mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16, off (fp32)")
    channels_last: bool = option(
        False, MODEL,
        help="channels-last memory format for the convolutional models")
    compile: bool = option(False, SPEED, run=False, help="torch.compile the model")
    teacher_cache: Optional[str] = option(
        None, SPEED, run=False,
        help="FILE of the frozen teacher's outputs for every augmented training input (in-memory "
             "datasets with pad-and-crop augmentation): looked up by the input's content "
             "instead of a teacher forward each step; built when FILE does not exist, refused "
             "when it was made for another teacher, precision or data")
    cuda_graph: str = option(
        "auto", SPEED, choices=("auto", "on", "off"), run=False,
        help="capture the whole training step in one CUDA graph and replay it: auto (on CUDA "
             "when the step can be graphed: fixed batch shapes, GenDD, AdamW, bf16/fp32, one "
             "process), on (refuse the run with the reason when it cannot), off")
    workers: int = option(
        4, DATA, range=at_least(0), run=False, evaluate=True,
        help="data loading worker processes per GPU")
    device: str = option(
        "auto", SPEED, choices=("auto", "cpu", "cuda"), recipe=False,
        help="device: auto (CUDA when available), cpu, cuda")
    # --- bookkeeping ---------------------------------------------------------------------------
    seed: int = option(0, RUN, recipe=False, help="random seed (each rank adds its rank)")
    output: str = option(
        "runs/gendd", RUN, run=False,
        help="folder for checkpoints, metrics.jsonl and curves")
    resume: Optional[str] = option(
        None, RUN, run=False,
        help="checkpoint to resume from, or 'auto' for OUTPUT/last.pt when it exists")
    overwrite: bool = option(
        False, RUN, run=False,
        help="start a fresh run even if OUTPUT already holds a checkpoint (it is replaced); "
             "without it such a run is refused")
    log_interval: int = option(
        20, RUN, range=at_least(1), run=False,
        help="steps between progress lines and metric records")
    eval_every: int = option(
        1, RUN, range=at_least(1), run=False,
        help="evaluate every N epochs (and after the last)")
    save_every: int = option(
        0, RUN, range=at_least(0), run=False,
        help="also save 'last' every N steps (0: once per epoch)")
    max_steps: int = option(
        0, RUN, range=at_least(0), run=False,
        help="stop after this many optimizer steps in all (0: run every epoch)")
    tensorboard: bool = option(
        False, RUN, run=False,
        help="also write TensorBoard scalars to OUTPUT")
    plot: bool = option(True, RUN, run=False, help="write OUTPUT/curves.png at the end")
    progress: bool = option(True, RUN, run=False, help="print the progress line")

    def resolved(self) -> "Config":
        """Fill the dataset-dependent defaults (image size, mul, eval batch)."""
        c = dataclasses.replace(self)
        small = c.dataset in ("digits", "cifar10", "cifar100", "synthetic")
        if c.image_size is None:
            c.image_size = 32 if small else 224
        if c.val_resize is None:
            c.val_resize = c.image_size if small else int(round(c.image_size / 0.875))
        if c.mul is None:
            c.mul = 30 if small else 10
        if c.eval_batch_size is None:
            c.eval_batch_size = max(c.batch_size, 128)
        return c


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _meta(name: str) -> Dict[str, Any]:
    return _FIELDS[name].metadata


def field_range(name: str) -> Optional[Range]:
    """The numeric range a Config field is declared with (None: no range)."""
    return _meta(name)["range"]


def field_choices(name: str):
    """The values a string Config field may take (None: any; the method: the registry's)."""
    return method_names() if name == "method" else _meta(name)["choices"]


# Fields that may differ between a run and its resume: they do not change what is computed.
RUN_IDENTITY_EXCLUDED = {f.name for f in dataclasses.fields(Config) if not f.metadata["run"]}
# Fields outside the recipe: a report groups the seeds of one recipe into one row.
NOT_RECIPE = {f.name for f in dataclasses.fields(Config) if not f.metadata["recipe"]}
# Every flag, grouped as timm groups its flags; the text is what --help prints.
FLAG_GROUPS = [(g, {f.name: f.metadata["help"] for f in dataclasses.fields(Config)
                    if f.metadata["group"] == g}) for g in GROUPS]
# Fields the evaluation entries (evaluate, report) take as options: (field, flag).
EVALUATION_FIELDS = [(f.name, f.metadata["evaluate"] if isinstance(f.metadata["evaluate"], str)
                      else _flag(f.name)) for f in dataclasses.fields(Config)
                     if f.metadata["evaluate"]]


def config_diff(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Human-readable differences in the fields that define the run."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in RUN_IDENTITY_EXCLUDED:
            continue
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: checkpoint has {a!r}, this run has {b!r}")
    return out


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _optional(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else conv(s)
    parse.__name__ = conv.__name__
    return parse


def _given_values(argv: Optional[List[str]]) -> Tuple[Dict[str, Any], List[str]]:
    """The field values ``argv`` sets: its ``--config`` recipes in order, then its explicit flags
    (parsed leniently: ``--help`` must still print when a flag is malformed)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config", action="append", default=[])
    _add_field_flags(pre, lambda name: argparse.SUPPRESS)
    known, _ = pre.parse_known_args(argv or [])
    values: Dict[str, Any] = {}
    for name in known.config:
        values.update(load_yaml(find_config(name)))
    flags = {f.name: getattr(known, f.name) for f in dataclasses.fields(Config)
             if getattr(known, f.name, None) is not None}
    values.update(flags)
    return values, known.config


def infer_dataset_notice(values: Dict[str, Any], say=None) -> Dict[str, Any]:
    """``--data-path`` without ``--dataset`` (in a recipe or on the command line) would train on
    the built-in digits: infer the kind from the folder's layout and say so in one line, or
    refuse naming the kinds."""
    if not values.get("data_path") or values.get("dataset"):
        return values
    from .data.datasets import infer_dataset
    kind, why = infer_dataset(values["data_path"])
    if kind is None:
        raise ValueError(f"--data-path {values['data_path']} was given without --dataset and "
                         f"its kind cannot be told from its layout ({why}); add --dataset "
                         f"({', '.join(d for d in DATASETS if d not in ('digits', 'synthetic'))})")
    if say is not None:
        say(f"--data-path without --dataset: {values['data_path']} holds {why}; using "
            f"--dataset {kind}")
    return dict(values, dataset=kind)


def _effective_defaults(argv: Optional[List[str]]) -> Tuple[Dict[str, Any], List[str]]:
    """The value each field takes when its flag is not given: the built-in default, overridden
    by the ``--config`` recipes and the flags named in ``argv`` (``--dataset imagefolder`` shows
    224-px defaults), then dataset-dependent values filled in as the run fills them."""
    try:
        values, recipes = _given_values(argv)
        values = infer_dataset_notice(values)
        resolved = dataclasses.asdict(Config(**values).resolved())
    except (TypeError, ValueError, FileNotFoundError, argparse.ArgumentError):
        values, recipes = {}, []
        resolved = dataclasses.asdict(Config().resolved())
    return resolved, recipes


def _default_text(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The trainer's parser; ``--help`` shows each flag's effective default (``argv`` is read for
    ``--config`` so a recipe's values are the ones shown)."""
    defaults, recipes = _effective_defaults(argv)
    shown = ("the recipe " + ", ".join(recipes)) if recipes else "the built-in values"
    shown += " with the flags given, the dataset's sizes filled in"
    p = argparse.ArgumentParser(
        prog="python -m gendd_fast.train",
        description="Train a student with GenDD or a baseline. With no arguments, runs the "
                    "embedded digits demo (teacher, scratch, KD, DKD, GenDD) and prints a table. "
                    f"Defaults shown are {shown}; flags given on the command line override them.")
    p.add_argument("--config", action="append", default=[],
                   help="YAML recipe (path, or a name under configs/); repeatable, later wins")
    p.add_argument("--demo", action="store_true", help="run the embedded digits pipeline")
    p.add_argument("--list-models", action="store_true", help="print the model zoo and exit")
    _add_field_flags(p, lambda name: f"(default: {_default_text(defaults[name])})")
    return p


def _add_field_flags(p: argparse.ArgumentParser, default_help):
    """Every field's flag, in its group; ``default_help(name)`` completes the help text."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for title, helps in FLAG_GROUPS:
        group = p.add_argument_group(title)
        for name, text in helps.items():
            tail = default_help(name)
            _add_flag(group, fields[name],
                      tail if tail == argparse.SUPPRESS else f"{text} {tail}")


def add_field_option(parser, name: str, flag: str, default_text: str):
    """An evaluation entry's option for Config field ``name`` (spelt ``flag``), with the
    field's own help, type and choices; dest is the field name, None when not given."""
    f = _FIELDS[name]
    _add_flag(parser, f, f"{f.metadata['help']} {default_text}", flag, with_choices=True)


def _add_flag(group, f: dataclasses.Field, help_text: str, flag: Optional[str] = None,
              with_choices: bool = False):
    flag = flag or _flag(f.name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    # dest defaults to None so that config_from_args can tell a given flag from an absent one
    kw: Dict[str, Any] = dict(dest=f.name, default=None, help=help_text)
    t = str(f.type)
    if isinstance(default, bool):
        kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        group.add_argument(flag, **kw)
        group.add_argument("--no-" + flag[2:], dest=f.name,
                           action="store_false", default=None, help=argparse.SUPPRESS)
        return
    if t.startswith("List"):
        inner = float if "float" in t else int
        kw.update(type=inner, nargs="+")
    elif "int" in t:
        kw.update(type=_optional(int) if t.startswith("Optional") else int)
    elif "float" in t:
        kw.update(type=_optional(float) if t.startswith("Optional") else float)
    else:
        kw.update(type=str)
    if with_choices and f.metadata["choices"]:
        kw.update(choices=list(f.metadata["choices"]))
    group.add_argument(flag, **kw)


def find_config(name: str) -> str:
    if os.path.isfile(name):
        return name
    for cand in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yaml")):
        if os.path.isfile(cand):
            return cand
    avail = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise FileNotFoundError(f"config {name!r} not found (not a file, not in configs/: "
                            f"{', '.join(avail) or 'none'})")


def load_yaml(path: str) -> Dict[str, Any]:
    import yaml
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:  # e.g. a !!python tag: refused by safe_load, named here
            raise ValueError(f"config {path}: not a plain YAML mapping of field: value "
                             f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of field: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown fields {unknown}; valid fields are the "
                         f"trainer's flags (python -m gendd_fast.train --help)")
    return data


def config_from_args(argv: Optional[List[str]] = None):
    """Parse ``argv`` into (Config, parsed namespace); Config is None for --list-models/--demo."""
    args = build_parser(argv).parse_args(argv)
    if args.list_models or args.demo:
        return None, args
    values: Dict[str, Any] = {}
    for name in args.config:
        values.update(load_yaml(find_config(name)))
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    from .notice import notice
    values = infer_dataset_notice(values, say=notice)
    return make_config(**values), args


def make_config(**values) -> Config:
    cfg = Config(**coerce_types(values))
    validate(cfg)
    return cfg


def coerce_types(values: Dict[str, Any]) -> Dict[str, Any]:
    """Each value converted to its field's declared type, or a named error (YAML gives strings
    for '1e-3' and lists for '[64]'; both used to fail later as a bare TypeError)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Config)}
    return {k: coerce_value(k, v, types[k]) if k in types else v for k, v in values.items()}


def validate(cfg: Config):
    """Refuse a config that cannot run, naming the flag: each field's declared choices and
    range (:func:`option`), then the rules that tie fields together."""
    for f in dataclasses.fields(Config):
        v, flag = getattr(cfg, f.name), _flag(f.name)
        options = field_choices(f.name)
        if options is not None and v not in options:
            raise ValueError(f"unknown {f.name.replace('_', '-')} {v!r}; valid: "
                             f"{', '.join(options)}")
        # Numbers that would divide by zero, index out of range or be ignored silently later
        # on (some only after a whole epoch) are refused here, before anything is built.
        # One validator (gendd_fast.validation.check_number): finite, in the declared range,
        # naming the field, the value and its type (Range.contains alone let NaN through).
        r = f.metadata["range"]
        optional = str(f.type).startswith("Optional")
        if r is not None and not (v is None and optional):
            check_number(f.name, v, interval(r.lo, r.hi, r.lo_open, r.hi_open),
                         integer="int" in str(f.type) and not isinstance(v, float))
    if method(cfg.method).needs_teacher:
        if not cfg.teacher:
            raise ValueError(f"method {cfg.method!r} needs a teacher (--teacher NAME "
                             f"--teacher-checkpoint PATH)")
    if len(cfg.crop_scale) != 2 or not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise ValueError(f"crop-scale must be two numbers 0 < lo <= hi <= 1, got {cfg.crop_scale}")
    if cfg.labeled_fraction < 1.0 and (cfg.mixup or cfg.cutmix or cfg.label_smoothing):
        raise ValueError("--labeled-fraction below 1 marks images unlabelled (-1), which Mixup, "
                         "CutMix and label smoothing cannot mix into soft labels; turn those off")
    if not cfg.labels and method(cfg.method).needs_labels:
        free = [m for m in method_names() if not method(m).needs_labels]
        raise ValueError(f"method {cfg.method!r} needs labels; unsupervised runs use --method "
                         f"{' or '.join(free)} with --labels false")
    if cfg.randaug:
        from .data.augment import parse_randaug
        parse_randaug(cfg.randaug)  # raises on a malformed policy
    if cfg.teacher_cache and not method(cfg.method).needs_teacher:
        raise ValueError(f"--teacher-cache: --method {cfg.method} has no teacher to cache")
    if cfg.teacher_pretrained and not (cfg.teacher or "").startswith("timm:"):
        raise ValueError(f"--teacher-pretrained applies to timm:NAME teachers, not "
                         f"{cfg.teacher!r} (torchvision teachers take --teacher-weights)")
    if cfg.teacher_weights and not (cfg.teacher or "").startswith("torchvision:"):
        raise ValueError(f"--teacher-weights applies to torchvision:NAME teachers, not "
                         f"{cfg.teacher!r} (zoo teachers take --teacher-checkpoint)")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas}")

    for f in dataclasses.fields(Config):  # no NaN/Inf in any numeric field, ranged or not
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, float):
                check_number(f.name, x)
