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

METHODS = method_names()  # the registry's (gendd_fast/distill/), in registration order
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "filelist", "webdataset", "synthetic")
# configs/ at the top of the repository, mapped into the package by setup.py (layout.py).
CONFIG_DIR = folder("configs")


@dataclass
class Config:
    # --- what to train -------------------------------------------------------------------------
    method: str = "gendd"            # ce | kd | dkd | ikl | gendd-pretrain | gendd
    student: str = "resnet8"
    teacher: Optional[str] = None    # needed by kd, dkd, gendd-pretrain, gendd
    teacher_checkpoint: Optional[str] = None
    init: Optional[str] = None       # student weights to start from (stage 2 from stage 1), non-strict
    teacher_pretrained: bool = False  # timm:NAME teachers: timm's own pretrained weights
    teacher_weights: Optional[str] = None  # torchvision:NAME teachers: weights enum, e.g. DEFAULT
    # --- data ----------------------------------------------------------------------------------
    dataset: str = "digits"
    data_path: Optional[str] = None  # dataset root (CIFAR pickle folder, ImageFolder root, ...)
    train_list: Optional[str] = None  # 'path label' file lists (ImageNet-LT), relative to data_path
    val_list: Optional[str] = None
    val_path: Optional[str] = None   # separate evaluation root (e.g. ImageNet val for CC3M runs)
    num_classes: Optional[int] = None  # inferred from the data when not given
    image_size: Optional[int] = None   # 32 for CIFAR/digits, 224 for ImageNet-style data
    val_resize: Optional[int] = None   # shorter side before the centre crop (256 for 224)
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop
    data_backend: str = "auto"       # auto | torch | dali
    skip_bad_images: bool = False
    synthetic_size: int = 256        # images in the 'synthetic' dataset (tests, benchmarks)
    # --- optimisation --------------------------------------------------------------------------
    epochs: int = 240
    batch_size: int = 64             # per GPU (per process)
    eval_batch_size: Optional[int] = None
    opt: str = "adamw"               # adamw | sgd
    opt_impl: str = "torch"          # torch | apex (FusedAdam / FusedSGD when apex is installed)
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    beta2_end: Optional[float] = None  # cosine ramp of beta2 from betas[1] to this (0.999)
    warmup_epochs: float = 0.0
    sched: str = "cos"               # cos | cos-epoch | step
    decay_epochs: List[int] = field(default_factory=lambda: [150, 180, 210])
    decay_rate: float = 0.1
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    # --- GenDD ---------------------------------------------------------------------------------
    token_dim: int = 64
    diffloss_w: int = 1024
    diffloss_d: int = 3
    mul: Optional[int] = None        # diffusion_batch_mul: 30 CIFAR, 10 ImageNet when not given
    cond_drop: float = 0.2
    beta: float = 1.0                # Beta(beta, beta) mixing; 0 disables
    smooth: float = 0.9              # distribution contraction; 0 for unsupervised runs
    labels: bool = True              # False: unsupervised GenDD (no CE, no contraction)
    head: str = "auto"               # auto | fused | torch   (auto: fused on CUDA)
    grad_checkpointing: bool = False
    sampling_steps: str = "64"       # respacing used when evaluating by sampling
    cfg: float = 2.0
    temperature: float = 1.0
    num_sampling: int = 1            # draws averaged per image in the final evaluation (5)
    ddim_steps: Optional[int] = None  # sample with DDIM over this many steps instead
    sample_eval: str = "end"          # end | every | never: when to run the sampling evaluation
    shot_split: str = "auto"          # auto | on | off: many/medium/few-shot accuracy
    # --- baselines -----------------------------------------------------------------------------
    kd_T: float = 4.0
    kd_alpha: float = 0.1            # weight of CE; (1 - alpha) on the KD term
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_T: float = 4.0
    dkd_warmup: int = 20
    dkd_ce_weight: float = 1.0
    ikl_alpha: float = 1.0           # weight of IKL's soft-label CE term
    ikl_beta: float = 0.5            # weight of IKL's weighted MSE on logit differences
    ikl_T: float = 1.0
    ikl_T2: float = 1.0              # temperature of the class weights of the weighted MSE
    ikl_gi: bool = True              # class-wise global information (needs labels)
    ikl_warmup: float = 1.0          # epochs of linear ramp of the IKL term
    ikl_ce_weight: float = 1.0
    # --- augmentation (BEiT -> ResNet-50 recipes) ----------------------------------------------
    randaug: Optional[str] = None    # RandAugment policy, e.g. rand-m7-n2-mstd0.5 (timm style)
    mixup: float = 0.0               # Mixup Beta(a, a); 0 disables
    cutmix: float = 0.0              # CutMix Beta(a, a); 0 disables
    mixup_prob: float = 1.0          # probability a batch is mixed at all
    mixup_switch_prob: float = 0.5   # with both on: probability of CutMix instead of Mixup
    label_smoothing: float = 0.0
    # --- performance ---------------------------------------------------------------------------
    amp: str = "auto"                # auto | bf16 | fp16 | off   (auto: bf16 on CUDA, off on CPU)
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    device: str = "auto"             # auto | cpu | cuda
    # --- bookkeeping ---------------------------------------------------------------------------
    seed: int = 0
    output: str = "runs/gendd"
    resume: Optional[str] = None     # PATH | auto
    overwrite: bool = False          # allow a fresh run into a folder that holds a checkpoint
    log_interval: int = 20
    eval_every: int = 1              # epochs
    save_every: int = 0              # also save 'last' every N steps (0: once per epoch)
    max_steps: int = 0               # stop after N optimizer steps in all (0: run every epoch)
    tensorboard: bool = False
    plot: bool = True
    progress: bool = True

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


# Fields that may differ between a run and its resume: they do not change what is computed.
RUN_IDENTITY_EXCLUDED = {"output", "resume", "workers", "log_interval", "tensorboard", "plot",
                         "progress", "data_path", "val_path", "train_list", "val_list",
                         "max_steps", "save_every", "eval_batch_size", "sample_eval",
                         "eval_every", "data_backend", "skip_bad_images", "teacher_checkpoint",
                         "init", "compile", "opt_impl", "overwrite",
                         "shot_split", "num_sampling"}


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


# Every flag, grouped as timm groups its flags; the text is what --help prints. A test checks
# that each Config field appears here exactly once, so a new field cannot ship without help.
FLAG_GROUPS = [
    ("data", {
        "dataset": "dataset kind: " + ", ".join(DATASETS),
        "data_path": "dataset root (CIFAR pickle folder, ImageFolder root with train/ and val/, "
                     "or the base of the file lists)",
        "train_list": "'path label' file list of the training images, relative to --data-path "
                      "(ImageNet-LT)",
        "val_list": "'path label' file list of the evaluation images",
        "val_path": "separate evaluation root (e.g. ImageNet val for CC3M runs)",
        "num_classes": "number of classes (inferred from the data when not given)",
        "image_size": "training crop size (32 for CIFAR/digits, 224 for ImageNet-style data)",
        "val_resize": "shorter side before the evaluation centre crop (256 for 224)",
        "crop_scale": "RandomResizedCrop area range LO HI (ImageNet-style data)",
        "data_backend": "data pipeline: dali (GPU JPEG decode), torch (DataLoader), auto (dali "
                        "on CUDA when installed)",
        "skip_bad_images": "skip undecodable images (counted each epoch) instead of stopping",
        "synthetic_size": "images in the 'synthetic' dataset (tests, benchmarks)",
        "workers": "data loading worker processes per GPU",
        "randaug": "RandAugment on the batch (on the GPU), timm-style policy rand-mM-nN[-mstdS], "
                   "e.g. rand-m7-n2-mstd0.5; none disables",
        "mixup": "Mixup alpha (Beta(a, a)) on training batches; labels become soft; 0 disables",
        "cutmix": "CutMix alpha (Beta(a, a)) on training batches; 0 disables",
        "mixup_prob": "probability that a training batch is mixed (Mixup or CutMix)",
        "mixup_switch_prob": "with --mixup and --cutmix both on: probability of CutMix",
        "label_smoothing": "label smoothing of the training labels (soft labels flow into CE, KD "
                           "and GenDD's contraction y @ W_t)",
    }),
    ("model", {
        "student": "student architecture (see --list-models)",
        "teacher": "teacher architecture (see --list-models)",
        "teacher_checkpoint": "teacher weights: a checkpoint of this trainer or a "
                              "{'model': state_dict} file",
        "teacher_pretrained": "with --teacher timm:NAME: timm's pretrained weights and input "
                              "normalisation (timm's download and cache); with "
                              "--teacher-checkpoint FILE, the weights and class count of that "
                              "file",
        "teacher_weights": "with --teacher torchvision:NAME: a weights name (DEFAULT, "
                           "IMAGENET1K_V2, ...) or a local state-dict file",
        "init": "start the student from these weights (stage 2 from stage 1); non-strict",
        "channels_last": "channels-last memory format for the convolutional models",
    }),
    ("method", {
        "method": "training method: " + ", ".join(METHODS),
        "labels": "use labels: false for unsupervised runs (GenDD: no CE, no contraction; kd: the "
                  "KL baseline, teacher soft targets only)",
        "smooth": "distribution contraction s: target = (1-s) f_t + s W_t[y]; 0 when unsupervised",
        "beta": "Beta(beta, beta) mixing of conditions and targets; 0 disables",
        "kd_T": "KD temperature",
        "kd_alpha": "KD: weight of the CE term; (1 - alpha) weights the KL term",
        "dkd_alpha": "DKD: weight of the target-class term (TCKD)",
        "dkd_beta": "DKD: weight of the non-target-class term (NCKD)",
        "dkd_T": "DKD temperature",
        "dkd_warmup": "DKD: epochs of linear warm-up of the distillation weight",
        "dkd_ce_weight": "DKD: weight of the CE term",
        "ikl_alpha": "IKL-KD: weight of the soft-label cross-entropy term",
        "ikl_beta": "IKL-KD: weight of the weighted MSE on pairwise logit differences",
        "ikl_T": "IKL-KD: temperature of the soft-label term",
        "ikl_T2": "IKL-KD: temperature of the teacher probabilities that weigh class pairs",
        "ikl_gi": "IKL-KD: weigh class pairs by the class-wise mean teacher probability (global "
                  "information) instead of the sample's own",
        "ikl_warmup": "IKL-KD: epochs over which the IKL term ramps up linearly",
        "ikl_ce_weight": "IKL-KD: weight of the cross-entropy on labels",
    }),
    ("GenDD head and sampling", {
        "token_dim": "token size d: the teacher feature is split into D_t/d tokens (must divide)",
        "diffloss_w": "width W of the diffusion head",
        "diffloss_d": "residual blocks of the diffusion head",
        "mul": "diffusion_batch_mul: copies of each token per step (30 CIFAR, 10 ImageNet)",
        "cond_drop": "probability of dropping the condition (classifier-free guidance training)",
        "head": "diffusion head: fused (Triton), torch (reference), auto (fused on CUDA)",
        "grad_checkpointing": "recompute head activations in the backward (saves memory)",
        "sampling_steps": "respaced DDPM steps for sampling evaluation, e.g. 100 or 64",
        "ddim_steps": "sample with DDIM over this many steps instead",
        "cfg": "classifier-free guidance scale at sampling",
        "temperature": "noise temperature at sampling",
        "num_sampling": "draws averaged per image before classifying, in the final evaluation "
                        "of best.pt and the last model (the paper: 5); evaluations during "
                        "training use 1",
        "sample_eval": "when to evaluate by sampling: every (each evaluation; best.pt is chosen "
                       "by sampling top-1, as in the paper), end (best.pt chosen by the linear "
                       "probe, sampling only in the final evaluation), never. Unsupervised "
                       "GenDD always selects by sampling",
    }),
    ("optimisation", {
        "epochs": "training epochs",
        "batch_size": "images per GPU (per process) per step",
        "eval_batch_size": "images per process per evaluation batch",
        "opt": "optimiser: adamw, sgd",
        "opt_impl": "optimiser implementation: torch (native fused on CUDA) or apex (FusedAdam "
                    "when NVIDIA apex is installed)",
        "lr": "peak learning rate",
        "weight_decay": "weight decay of the decayed parameter group",
        "momentum": "SGD momentum",
        "betas": "AdamW betas BETA1 BETA2 (BETA2 is the start of the ramp when --beta2-end "
                 "is set)",
        "beta2_end": "ramp AdamW beta2 from BETA2 of --betas to this value along a per-step "
                     "cosine, reached on the last step (the paper: 0.999); none: constant",
        "warmup_epochs": "linear learning-rate warm-up, in epochs",
        "sched": "learning-rate schedule: cos (per-step cosine to --min-lr), cos-epoch "
                 "(per-epoch warm-up and cosine, the paper's ImageNet schedule), step (x "
                 "--decay-rate at --decay-epochs)",
        "decay_epochs": "epochs at which --sched step multiplies the lr by --decay-rate",
        "decay_rate": "factor of each step decay",
        "min_lr": "learning rate at the end of the cosine",
        "clip_grad": "clip the gradient norm to this value (none: no clipping)",
    }),
    ("precision and speed", {
        "amp": "mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16, off (fp32)",
        "compile": "torch.compile the model",
        "device": "device: auto (CUDA when available), cpu, cuda",
    }),
    ("run and checkpoints", {
        "seed": "random seed (each rank adds its rank)",
        "output": "folder for checkpoints, metrics.jsonl and curves",
        "resume": "checkpoint to resume from, or 'auto' for OUTPUT/last.pt when it exists",
        "overwrite": "start a fresh run even if OUTPUT already holds a checkpoint (it is "
                     "replaced); without it such a run is refused",
        "log_interval": "steps between progress lines and metric records",
        "eval_every": "evaluate every N epochs (and after the last)",
        "shot_split": "also report many/medium/few-shot top-1 (classes with >100, 20-100, <20 "
                      "training images): on, off, auto (on for a long-tailed --train-list)",
        "save_every": "also save 'last' every N steps (0: once per epoch)",
        "max_steps": "stop after this many optimizer steps in all (0: run every epoch)",
        "tensorboard": "also write TensorBoard scalars to OUTPUT",
        "plot": "write OUTPUT/curves.png at the end",
        "progress": "print the progress line",
    }),
]


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


def _add_flag(group, f: dataclasses.Field, help_text: str):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    # dest defaults to None so that config_from_args can tell a given flag from an absent one
    kw: Dict[str, Any] = dict(dest=f.name, default=None, help=help_text)
    t = str(f.type)
    if isinstance(default, bool):
        kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        group.add_argument(_flag(f.name), **kw)
        group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
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
    group.add_argument(_flag(f.name), **kw)


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
        data = yaml.safe_load(fh) or {}
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
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    def choice(name, options):
        v = getattr(cfg, name)
        if v not in options:
            raise ValueError(f"unknown {name.replace('_', '-')} {v!r}; valid: {', '.join(options)}")
    choice("method", method_names())
    choice("dataset", DATASETS)
    choice("amp", ("auto", "bf16", "fp16", "off"))
    choice("sched", ("cos", "cos-epoch", "step"))
    choice("shot_split", ("auto", "on", "off"))
    choice("opt", ("adamw", "sgd"))
    choice("opt_impl", ("torch", "apex"))
    choice("head", ("auto", "fused", "torch"))
    choice("data_backend", ("auto", "torch", "dali"))
    choice("device", ("auto", "cpu", "cuda"))
    choice("sample_eval", ("end", "every", "never"))
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch-size must be positive")

    # Numbers that would divide by zero, index out of range or be ignored silently later on
    # (some only after a whole epoch) are refused here, before anything is built.
    def at_least(name, lo, optional=False):
        v = getattr(cfg, name)
        if v is None and optional:
            return
        if v is None or v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {lo}, got {v!r}")

    def positive(name, optional=False):
        v = getattr(cfg, name)
        if v is None and optional:
            return
        if v is None or not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v!r}")

    for name in ("log_interval", "eval_every", "token_dim", "diffloss_w", "diffloss_d",
                 "num_sampling", "synthetic_size"):
        at_least(name, 1)
    for name in ("mul", "eval_batch_size", "image_size", "val_resize", "ddim_steps"):
        at_least(name, 1, optional=True)
    at_least("num_classes", 2, optional=True)
    for name in ("max_steps", "save_every", "workers", "dkd_warmup"):
        at_least(name, 0)   # 0 means 'off' / 'in the main process'
    for name in ("warmup_epochs", "weight_decay", "min_lr", "lr", "beta", "cfg", "decay_rate"):
        at_least(name, 0)
    for name in ("temperature", "kd_T", "dkd_T"):
        positive(name)
    positive("clip_grad", optional=True)
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {cfg.momentum}")
    if method(cfg.method).needs_teacher:
        if not cfg.teacher:
            raise ValueError(f"method {cfg.method!r} needs a teacher (--teacher NAME "
                             f"--teacher-checkpoint PATH)")
    if not 0.0 <= cfg.smooth < 1.0:
        raise ValueError(f"smooth must lie in [0, 1), got {cfg.smooth}")
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise ValueError(f"cond-drop must lie in [0, 1), got {cfg.cond_drop}")
    if len(cfg.crop_scale) != 2 or not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise ValueError(f"crop-scale must be two numbers 0 < lo <= hi <= 1, got {cfg.crop_scale}")
    if not cfg.labels and method(cfg.method).needs_labels:
        free = [m for m in method_names() if not method(m).needs_labels]
        raise ValueError(f"method {cfg.method!r} needs labels; unsupervised runs use --method "
                         f"{' or '.join(free)} with --labels false")
    for name in ("mixup", "cutmix"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 disables), got {getattr(cfg, name)}")
    for name in ("mixup_prob", "mixup_switch_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name.replace('_', '-')} must lie in [0, 1], got "
                             f"{getattr(cfg, name)}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"label-smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if cfg.randaug:
        from .data.augment import parse_randaug
        parse_randaug(cfg.randaug)  # raises on a malformed policy
    if cfg.ikl_T <= 0 or cfg.ikl_T2 <= 0:
        raise ValueError(f"ikl-T and ikl-T2 must be positive, got {cfg.ikl_T}, {cfg.ikl_T2}")
    if cfg.teacher_pretrained and not (cfg.teacher or "").startswith("timm:"):
        raise ValueError(f"--teacher-pretrained applies to timm:NAME teachers, not "
                         f"{cfg.teacher!r} (torchvision teachers take --teacher-weights)")
    if cfg.teacher_weights and not (cfg.teacher or "").startswith("torchvision:"):
        raise ValueError(f"--teacher-weights applies to torchvision:NAME teachers, not "
                         f"{cfg.teacher!r} (zoo teachers take --teacher-checkpoint)")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas}")
    if cfg.beta2_end is not None and not 0.0 < cfg.beta2_end < 1.0:
        raise ValueError(f"beta2-end must lie in (0, 1), got {cfg.beta2_end}")
    if cfg.num_sampling < 1:
        raise ValueError(f"num-sampling must be at least 1, got {cfg.num_sampling}")
