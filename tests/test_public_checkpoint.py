"""Checkpoints of the public GenDD code load for evaluation, --init and --teacher-checkpoint.

The files are built here by the public code's key names (its ``DiffModel``: ``model.*``,
``classifier.*``, ``cls_centers``, ``chunk_idx``, ``cls_projector.*``, ``diffloss.net.*``,
``proj.*``), in its two layouts: CIFAR ``{'model': state, 'opt': Namespace}`` and ImageNet
``{'state_dict': {'module.' + key: ...}}`` from a DistributedDataParallel model.
"""
import argparse
import os

import pytest
import torch
import yaml

from gendd_fast import evaluate
from gendd_fast.checkpoint import join_state
from gendd_fast.models import create_model
from gendd_fast.public_checkpoint import (PublicCheckpointError, inferred_config, is_public,
                                          load_student_weights, load_teacher_weights,
                                          to_gendd_fast)
from gendd_fast.train import train
from helpers import STUDENT, TEACHER, save_teacher, tiny_config


def public_state(ours):
    """Our distiller's state under the public DiffModel's names (as its code writes them)."""
    out = {}
    for k, v in ours.items():
        if k.startswith("student."):
            out["model." + k[len("student."):]] = v
        elif k.startswith("teacher_fc."):
            out["classifier." + k[len("teacher_fc."):]] = v
        else:
            out[k] = v
    if "classifier.weight" in out and any(k.startswith("diffloss.") for k in out):
        out["cls_centers"] = out["classifier.weight"].clone()
        tokens = out["diffloss.net.pos_embed.weight"].shape[0]
        out["chunk_idx"] = torch.arange(tokens)[None]
    return out


def save_public(path, state, layout):
    if layout == "cifar":
        torch.save({"epoch": 240, "model": state, "best_acc": torch.tensor(70.0),
                    "opt": argparse.Namespace(model_s=STUDENT, smooth=0.9)}, path)
    else:  # ImageNet scripts: DDP-wrapped model, saved under 'state_dict'
        torch.save({"epoch": 100, "arch": STUDENT, "best_acc1": 70.0,
                    "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def gendd_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gendd")
    teacher, _ = save_teacher(tmp)
    cfg = tiny_config(tmp, "gendd", teacher, epochs=1, sample_eval="never")
    train(cfg)
    ours = torch.load(os.path.join(cfg.output, "last.pt"), weights_only=False)
    return tmp, cfg, ours


def _recipe(tmp, cfg):
    """The tiny run's settings as a recipe file, as a user would pass the paper's recipe."""
    keep = ("dataset", "synthetic_size", "num_classes", "image_size", "batch_size", "sampling_steps",
            "mul", "workers", "device", "seed")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({k: getattr(cfg, k) for k in keep}))
    return str(path)


@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_public_gendd_checkpoint_evaluates_like_ours(gendd_run, layout):
    tmp, cfg, ours = gendd_run
    state = join_state(ours)
    pub = public_state(state)
    assert is_public(pub) and not is_public(state)
    assert to_gendd_fast(pub).keys() == state.keys()
    path = save_public(tmp / f"public_{layout}.pth", pub, layout)
    assert inferred_config(pub) == dict(method="gendd", diffloss_w=cfg.diffloss_w,
                                        token_dim=cfg.token_dim, diffloss_d=cfg.diffloss_d,
                                        num_classes=cfg.num_classes)
    common = ["--sampling-steps", "4", "--num-sampling", "2", "--device", "cpu", "--seed", "3"]
    want = evaluate.main(["--checkpoint", os.path.join(cfg.output, "last.pt")] + common)
    got = evaluate.main(["--checkpoint", path, "--config", _recipe(tmp, cfg),
                         "--student", STUDENT, "--teacher", TEACHER] + common)
    for k in ("top1", "top5", "sample_top1", "sample_top5", "n"):
        assert got[k] == pytest.approx(want[k]), k   # same weights, same seed, same draws
    assert got["method"] == "gendd"


def test_public_checkpoint_without_models_is_a_clear_error(gendd_run):
    tmp, _, ours = gendd_run
    path = save_public(tmp / "bare.pth", public_state(join_state(ours)), "cifar")
    with pytest.raises(SystemExit, match="carries no config"):
        evaluate.main(["--checkpoint", path, "--device", "cpu"])


def test_init_from_public_stage1_checkpoint(tmp_path):
    """--init: a public stage-1 file (model.*, proj.*, classifier.*) starts the student."""
    src = create_model(STUDENT, 4)
    torch.nn.init.normal_(src.fc.weight)
    pub = {"model." + k: v for k, v in src.state_dict().items()}
    pub.update({"proj.weight": torch.randn(64, 64), "proj.bias": torch.zeros(64),
                "classifier.weight": torch.randn(4, 64), "classifier.bias": torch.zeros(4)})
    path = save_public(tmp_path / "stage1.pth", pub, "imagenet")
    dst = create_model(STUDENT, 4)
    msg = load_student_weights(path, dst)
    assert "public GenDD layout" in msg
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # through the trainer: stage 2 from the public stage 1, no step taken (lr ~ 0)
    teacher, _ = save_teacher(tmp_path)
    cfg = tiny_config(tmp_path, "gendd", teacher, epochs=1, init=path, lr=1e-12,
                      sample_eval="never", beta2_end=None)
    train(cfg)
    after = torch.load(os.path.join(cfg.output, "last.pt"), weights_only=False)["model"]
    assert torch.allclose(after["conv1.weight"], src.state_dict()["conv1.weight"], atol=1e-6)


def test_teacher_from_public_checkpoint(tmp_path):
    src = create_model(TEACHER, 4)
    torch.nn.init.normal_(src.fc.weight)
    pub = {"model." + k: v for k, v in src.state_dict().items()}
    pub.update({"classifier.weight": torch.randn(4, 64), "cls_centers": torch.randn(4, 64)})
    path = save_public(tmp_path / "t.pth", pub, "cifar")
    dst = create_model(TEACHER, 4)
    load_teacher_weights(path, dst)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(PublicCheckpointError, match="missing keys"):
        load_teacher_weights(path, create_model("resnet20", 4))
    # a plain teacher file still goes through the zoo's loader
    plain, model = save_teacher(tmp_path, prefix="module.", classifier="linear")
    again = create_model(TEACHER, 4)
    load_teacher_weights(plain, again)
    assert torch.equal(again.fc.weight, model.fc.weight)


def test_public_checkpoint_with_cls_centers_and_no_classifier_weight_evaluates(gendd_run):
    """The public DiffModel keeps the teacher's classifier weight twice: ``classifier.weight``
    and the buffer ``cls_centers``. A file holding only ``cls_centers`` still gives the sampled
    features their classifier: it evaluates exactly as our own checkpoint of the same weights.
    Planted: cls_centers no longer used as the teacher classifier -> fails."""
    tmp, cfg, ours = gendd_run
    pub = public_state(join_state(ours))
    del pub["classifier.weight"]
    assert "cls_centers" in pub
    assert torch.equal(to_gendd_fast(pub)["teacher_fc.weight"], pub["cls_centers"])
    path = save_public(tmp / "centers_only.pth", pub, "cifar")
    common = ["--sampling-steps", "4", "--num-sampling", "1", "--device", "cpu", "--seed", "3"]
    want = evaluate.main(["--checkpoint", os.path.join(cfg.output, "last.pt")] + common)
    got = evaluate.main(["--checkpoint", path, "--config", _recipe(tmp, cfg),
                         "--student", STUDENT, "--teacher", TEACHER] + common)
    for k in ("top1", "sample_top1", "sample_top5", "n"):
        assert got[k] == pytest.approx(want[k]), k
