"""Checkpoint rules: which state may repair a stale best.pt, and what --init loads."""
import os

import torch

from gendd_fast import checkpoint as ckpt_io
from gendd_fast.models import create_model


def _state(epoch, step_in_epoch, best_epoch, value):
    return {"model": {"w": torch.full((3,), value)}, "extra": {}, "global_step": 4 * epoch
            + step_in_epoch, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "best": {"top1": 60.0, "epoch": best_epoch}}


def test_mid_epoch_last_checkpoint_never_repairs_best(tmp_path):
    """last.pt can stand in for a stale best.pt only when it was written at the very end of the
    best epoch (epoch == best epoch and step_in_epoch == 0). A mid-epoch last.pt with the same
    epoch counter holds weights trained past the best: best.pt stays as it is.
    Planted: repair_best ignoring step_in_epoch -> fails."""
    out = str(tmp_path)
    old = _state(1, 0, 1, value=1.0)
    ckpt_io.atomic_save(old, os.path.join(out, "best.pt"))
    mid = _state(2, 3, 2, value=2.0)   # best was epoch 2; then 3 more steps of epoch 3
    msg = ckpt_io.repair_best(mid, out)
    assert msg is not None and "no longer on disk" in msg
    kept = ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], old["model"]["w"])
    end = _state(2, 0, 2, value=3.0)   # written at the end of the best epoch: it is the best
    assert "rewrote" in ckpt_io.repair_best(end, out)
    assert ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))["epoch"] == 2


def test_init_skips_tensors_of_another_shape_and_reports_k_of_n(tmp_path):
    """--init from a checkpoint whose classifier has another class count: every tensor of the
    same name and shape loads, the two classifier tensors are skipped, and the summary says
    how many of the student's tensors were loaded.
    Planted: the shape filter dropped from load_student_weights -> fails."""
    torch.manual_seed(0)
    src = create_model("resnet8", 10)
    path = str(tmp_path / "stage1.pt")
    torch.save({"model": src.state_dict()}, path)
    torch.manual_seed(1)
    dst = create_model("resnet8", 4)
    fc_before = dst.fc.weight.detach().clone()
    msg = ckpt_io.load_student_weights(path, dst)
    n = len(dst.state_dict())
    assert f"loaded {n - 2}/{n} student tensors" in msg
    assert torch.equal(dst.fc.weight, fc_before)
    for k, v in dst.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, src.state_dict()[k]), k
