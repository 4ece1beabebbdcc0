"""The trainer end to end on tiny synthetic data: every method, exact resume, errors, evaluate."""
import dataclasses
import os

import pytest
import torch

from gendd_fast import checkpoint as ckpt_io
from gendd_fast.distill import CE
from gendd_fast.train import NonFiniteLoss, train
from helpers import read_metrics, save_teacher, tiny_config
import signal
import subprocess
import sys
import time
from helpers import _disk_full, _env, _folder_cmd, _image_folder


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path, _ = save_teacher(tmp_path_factory.mktemp("teacher"))
    return path


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "gendd-pretrain", "gendd"])
def test_every_method_trains_and_loss_decreases(tmp_path, teacher_ckpt, method):
    cfg = tiny_config(tmp_path, method, teacher_ckpt, epochs=6, dkd_warmup=1,
                      sample_eval="never")
    res = train(cfg)
    losses = [r["loss"] for r in read_metrics(cfg.output)]
    assert len(losses) == 6 * 4
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, (method, first, last)
    assert 0.0 <= res["top1"] <= 100.0 and res["n"] == 16
    state = torch.load(os.path.join(cfg.output, "last.pt"), weights_only=False)
    assert state["global_step"] == 24 and state["epoch"] == 6
    if method == "gendd":
        assert any(k.startswith("diffloss.net.res_blocks.1.adaLN_modulation.1")
                   for k in state["extra"])
        assert "cls_projector.0.weight" in state["extra"]


def test_gendd_unsupervised_needs_no_labels(tmp_path, teacher_ckpt):
    cfg = tiny_config(tmp_path, "gendd", teacher_ckpt, labels=False, smooth=0.0, epochs=1,
                      sample_eval="never")
    train(cfg)
    parts = read_metrics(cfg.output)
    assert "ce" not in parts[-1] and "diff" in parts[-1]


def _params(path):
    state = torch.load(path, weights_only=False)
    return ckpt_io.join_state(state), state


@pytest.mark.parametrize("method", ["gendd", "kd"])
def test_resume_is_exact(tmp_path, teacher_ckpt, method):
    """N steps straight == N/2 steps, stop (mid-epoch), resume, the remaining N/2."""
    straight = tiny_config(tmp_path / "a", method, teacher_ckpt, epochs=2, sample_eval="never")
    train(straight)
    first = tiny_config(tmp_path / "b", method, teacher_ckpt, epochs=2, max_steps=3,
                        sample_eval="never")
    train(first)
    mid, mid_state = _params(os.path.join(first.output, "last.pt"))
    assert mid_state["global_step"] == 3 and mid_state["step_in_epoch"] == 3
    resumed = dataclasses.replace(first, max_steps=0, resume="auto")
    train(resumed)
    a, sa = _params(os.path.join(straight.output, "last.pt"))
    b, sb = _params(os.path.join(resumed.output, "last.pt"))
    assert sa["global_step"] == sb["global_step"] == 8
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # the resumed half did train
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"])
    # the metrics history reads as one run: one entry per step, no duplicates
    steps = [r["step"] for r in read_metrics(resumed.output)]
    assert steps == list(range(1, 9))


def test_resume_from_a_different_config_names_the_fields(tmp_path):
    cfg = tiny_config(tmp_path, "ce", epochs=1)
    train(cfg)
    other = dataclasses.replace(cfg, lr=5e-3, batch_size=8, resume="auto")
    with pytest.raises(ckpt_io.CheckpointError) as e:
        train(other)
    assert "lr: checkpoint has 0.002, this run has 0.005" in str(e.value)
    assert "batch_size" in str(e.value)


def test_resume_from_missing_or_corrupt_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "ce", epochs=1, resume=str(tmp_path / "nope.pt"))
    with pytest.raises(ckpt_io.CheckpointError, match="no such checkpoint"):
        train(cfg)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match="could not be read"):
        train(dataclasses.replace(cfg, resume=str(bad)))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = CE.forward

    def poisoned(self, *a, **kw):
        loss, parts = real(self, *a, **kw)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 6 else (loss, parts)

    monkeypatch.setattr(CE, "forward", poisoned)
    cfg = tiny_config(tmp_path, "ce", epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"at step 6 \(epoch 2\)") as e:
        train(cfg)
    assert "last.pt (step 4), is untouched" in str(e.value)
    state, meta = _params(os.path.join(cfg.output, "last.pt"))
    assert meta["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    ckpt_io.atomic_save({"a": torch.ones(3)}, str(target))

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt_io.atomic_save({"a": torch.zeros(3)}, str(target))
    assert torch.equal(torch.load(target)["a"], torch.ones(3))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left


def test_stage_two_initialises_from_stage_one(tmp_path, teacher_ckpt):
    s1 = tiny_config(tmp_path / "s1", "gendd-pretrain", teacher_ckpt, epochs=1)
    train(s1)
    s2 = tiny_config(tmp_path / "s2", "gendd", teacher_ckpt, epochs=1, max_steps=1,
                     init=os.path.join(s1.output, "last.pt"), lr=1e-12, sample_eval="never")
    train(s2)
    a = torch.load(os.path.join(s1.output, "last.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(s2.output, "last.pt"), weights_only=False)["model"]
    k = "layer1.0.conv1.weight"
    torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_gendd_sampling_evaluation_and_evaluate_cli(tmp_path, teacher_ckpt, capsys):
    from gendd_fast import evaluate
    cfg = tiny_config(tmp_path, "gendd", teacher_ckpt, epochs=1, sample_eval="end")
    res = train(cfg)
    assert 0 <= res["sample_top1"] <= 100 and 0 <= res["sample_top5"] <= 100
    out = tmp_path / "eval.json"
    got = evaluate.main(["--checkpoint", os.path.join(cfg.output, "last.pt"),
                         "--sampling-steps", "4", "--cfg", "2.0", "--json", str(out)])
    assert got["top1"] == pytest.approx(res["top1"])   # same weights, same held-out images
    assert "sample_top1" in got and got["n"] == 16 and out.exists()
    printed = capsys.readouterr().out
    assert "sample_top1" in printed
    ddim = evaluate.main(["--checkpoint", os.path.join(cfg.output, "last.pt"),
                          "--ddim-steps", "5", "--num-sampling", "2"])
    assert ddim["top1"] == pytest.approx(res["top1"]) and "sample_top1" in ddim
    probe = evaluate.main(["--checkpoint", os.path.join(cfg.output, "last.pt"), "--no-sample"])
    assert "sample_top1" not in probe


def test_plot_and_metrics_written(tmp_path):
    cfg = tiny_config(tmp_path, "ce", epochs=1, plot=True)
    train(cfg)
    assert os.path.getsize(os.path.join(cfg.output, "curves.png")) > 1000
    assert read_metrics(cfg.output, "val")[-1]["top1"] >= 0


def test_sigterm_saves_and_exits_then_resume_finishes(tmp_path):
    """Pre-emption: SIGTERM mid-run saves 'last' at the next step and exits cleanly."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset", "synthetic",
           "--synthetic-size", "64", "--num-classes", "4", "--image-size", "16",
           "--batch-size", "16", "--epochs", "200", "--student", "resnet8", "--workers", "0",
           "--device", "cpu", "--log-interval", "1", "--no-plot", "--no-progress",
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists()
                                      or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    # the last line and metrics.jsonl's last record say it was interrupted, not "done"
    assert "interrupted by signal SIGTERM" in err.strip().splitlines()[-1], err[-500:]
    import json
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["type"] == "end" and end["status"] == "interrupted"
    state = torch.load(out / "last.pt", weights_only=False)
    assert 0 < state["global_step"] < 800
    r = subprocess.run(cmd + ["--resume", "auto", "--max-steps", str(state["global_step"] + 3)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    after = torch.load(out / "last.pt", weights_only=False)
    assert after["global_step"] == state["global_step"] + 3


def test_evaluate_needs_neither_the_init_nor_the_teacher_file(tmp_path, teacher_ckpt):
    """A trained checkpoint carries every weight: evaluating it must not reload the stage-1
    (--init) or teacher files it was trained from, which are often deleted or on another machine."""
    import shutil

    from gendd_fast import evaluate
    teacher = os.path.join(str(tmp_path), "teacher_copy.pt")  # the shared fixture stays
    shutil.copy(teacher_ckpt, teacher)
    stage1 = tiny_config(tmp_path / "s1", "gendd-pretrain", teacher, epochs=1)
    train(stage1)
    init = os.path.join(str(tmp_path), "stage1.pt")
    shutil.copy(os.path.join(stage1.output, "last.pt"), init)
    cfg = tiny_config(tmp_path / "s2", "gendd", teacher, epochs=1, init=init)
    res = train(cfg)
    os.remove(init)
    os.remove(teacher)
    got = evaluate.main(["--checkpoint", os.path.join(cfg.output, "last.pt"), "--no-sample"])
    assert got["top1"] == pytest.approx(res["top1"])


# Hostile input and faults (moved from the campaign file test_hardening.py): no code runs from a
# checkpoint or a CIFAR file, signals and full disks are survived with a clear message, and nothing
# on disk is silently lost or left stale.


def test_sigterm_to_process_group_with_workers_saves_and_exits_0(tmp_path):
    """scancel / an eviction signals every process of the job: DataLoader workers must survive
    it so the main process can save at the next step and exit 0."""
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = _folder_cmd(data, str(out), "--epochs", "500", "--workers", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=_env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and (not metrics.exists()
                                          or len(metrics.read_text().splitlines()) < 6):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "killed by signal" not in err and "exited unexpectedly" not in err
    state = ckpt_io.read_checkpoint(str(out / "last.pt"))
    assert state["global_step"] >= 5


def test_disk_full_during_training(tmp_path, monkeypatch):
    from gendd_fast.train import train
    cfg = tiny_config(tmp_path, "ce", epochs=1, max_steps=2)
    train(cfg)
    before = ckpt_io.read_checkpoint(os.path.join(cfg.output, "last.pt"))["global_step"]
    _disk_full(monkeypatch, cfg.output)
    import dataclasses
    with pytest.raises(ckpt_io.DiskFullError, match=r"no space left on device while writing "
                                                    r".*last.pt; the previous .*last.pt is kept"):
        train(dataclasses.replace(cfg, max_steps=0, resume="auto"))
    monkeypatch.undo()
    assert ckpt_io.read_checkpoint(os.path.join(cfg.output, "last.pt"))["global_step"] == before


# -- 3. a fresh run never overwrites a folder's checkpoint silently ------------------------------
def test_fresh_run_into_a_checkpoint_folder_is_refused(tmp_path):
    import dataclasses

    from gendd_fast.train import train
    cfg = tiny_config(tmp_path, "ce", epochs=1)
    train(cfg)
    last = os.path.join(cfg.output, "last.pt")
    before = ckpt_io.read_checkpoint(last)["global_step"]
    metrics = open(os.path.join(cfg.output, "metrics.jsonl")).read()
    again = dataclasses.replace(cfg, max_steps=1)
    with pytest.raises(ckpt_io.CheckpointError, match=r"already holds a checkpoint \(last.pt\).*"
                                                      r"--resume auto.*--output.*--overwrite"):
        train(again)
    assert ckpt_io.read_checkpoint(last)["global_step"] == before
    assert open(os.path.join(cfg.output, "metrics.jsonl")).read() == metrics
    train(dataclasses.replace(again, overwrite=True))
    assert ckpt_io.read_checkpoint(last)["global_step"] == 1
    assert not os.path.exists(os.path.join(cfg.output, "best.pt"))  # the old run's is gone


def test_fresh_run_refusal_on_the_cli(tmp_path):
    out = tmp_path / "run"
    ckpt_io.atomic_save({"model": {}}, str(out / "best.pt"))
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset",
                        "synthetic", "--output", str(out), "--device", "cpu", "--epochs", "1",
                        "--max-steps", "1", "--synthetic-size", "16", "--batch-size", "8",
                        "--image-size", "16", "--no-plot", "--no-progress"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: output folder {str(out)!r} already holds a checkpoint (best.pt, but no " \
           f"last.pt to resume from)" in r.stderr


# -- 5. non-finite weights or buffers are never saved; the message names what is on disk -------
def test_infinite_batchnorm_statistics_are_not_saved(tmp_path, monkeypatch):
    """A huge lr makes BatchNorm running variances Inf while the training loss (which uses batch
    statistics) stays finite: the guard must look at buffers too, and save nothing bad."""
    from gendd_fast.distill import CE
    from gendd_fast.train import NonFiniteLoss, train
    calls = {"n": 0}
    real = CE.forward

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2 of 4-step epochs
            bn = next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return real(self, *a, **kw)

    monkeypatch.setattr(CE, "forward", poisoned)
    cfg = tiny_config(tmp_path, "ce", epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"running_var.*it was not saved and the newest good "
                                            r"checkpoint on disk, .*last.pt \(step 4\)"):
        train(cfg)
    state = ckpt_io.read_checkpoint(os.path.join(cfg.output, "last.pt"))
    assert state["global_step"] == 4
    assert not ckpt_io.nonfinite_names({**state["model"], **state["extra"]})


def test_nan_message_names_a_checkpoint_an_earlier_process_wrote(tmp_path, monkeypatch):
    import dataclasses

    from gendd_fast.distill import CE
    from gendd_fast.train import NonFiniteLoss, train
    cfg = tiny_config(tmp_path, "ce", epochs=2, max_steps=4)
    train(cfg)  # an earlier process: last.pt at step 4
    real = CE.forward
    monkeypatch.setattr(CE, "forward",
                        lambda self, *a, **kw: (lambda lp: (lp[0] * float("nan"), lp[1]))(
                            real(self, *a, **kw)))
    with pytest.raises(NonFiniteLoss) as e:
        train(dataclasses.replace(cfg, max_steps=0, resume="auto"))
    assert "no checkpoint had been written" not in str(e.value)
    assert "last.pt (step 4), is untouched" in str(e.value)


# -- 6. best.pt is repaired on resume; temporary files of killed writes go ------------------------
def test_stale_best_is_rewritten_on_resume_and_temps_removed(tmp_path, monkeypatch):
    import dataclasses

    from gendd_fast.train import train
    cfg = tiny_config(tmp_path, "ce", epochs=3, lr=1e-2)
    real = ckpt_io.atomic_save
    writes = {"best": 0}

    class Killed(BaseException):
        pass

    def killed_during_second_best(obj, path):
        if path.endswith("best.pt"):
            writes["best"] += 1
            if writes["best"] == 2:  # the process dies while writing best.pt a second time
                open(os.path.join(os.path.dirname(path), ".best.pt.dead.tmp"), "wb").close()
                raise Killed()
        return real(obj, path)

    monkeypatch.setattr(ckpt_io, "atomic_save", killed_during_second_best)
    # make every evaluation a new best, so epoch 2 writes best.pt again
    from gendd_fast import train as train_mod
    top = iter(range(10, 100, 10))
    monkeypatch.setattr(train_mod, "evaluate",
                        lambda *a, **kw: {"top1": float(next(top)), "top5": 100.0, "n": 1})
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(ckpt_io, "atomic_save", real)
    out = cfg.output
    last = ckpt_io.read_checkpoint(os.path.join(out, "last.pt"))
    assert last["best"]["epoch"] == 2
    assert ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))["best"]["epoch"] == 1  # stale
    assert os.path.exists(os.path.join(out, ".best.pt.dead.tmp"))
    train(dataclasses.replace(cfg, resume="auto", max_steps=last["global_step"]))
    best = ckpt_io.read_checkpoint(os.path.join(out, "best.pt"))
    assert best["best"]["epoch"] == 2 and best["global_step"] == last["global_step"]
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v)
    assert not os.path.exists(os.path.join(out, ".best.pt.dead.tmp"))


# -- 8. resuming with another teacher file is refused ---------------------------------------------
def test_resume_with_a_different_teacher_is_refused(tmp_path):
    import dataclasses

    from gendd_fast.train import train
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    t1, _ = save_teacher(tmp_path / "t1", seed=0)
    t2, _ = save_teacher(tmp_path / "t2", seed=1)
    cfg = tiny_config(tmp_path, "kd", t1, epochs=2, max_steps=2)
    train(cfg)
    with pytest.raises(ckpt_io.CheckpointError, match=r"trained with the teacher checkpoint "
                                                      r"'teacher_resnet8.pt'.*sha256"):
        train(dataclasses.replace(cfg, teacher_checkpoint=t2, resume="auto", max_steps=3))
    # the same teacher under another path (a moved run) is fine
    moved = tmp_path / "moved.pt"
    moved.write_bytes(open(t1, "rb").read())
    res = train(dataclasses.replace(cfg, teacher_checkpoint=str(moved), resume="auto",
                                    max_steps=3))
    assert res["global_step"] == 3


# -- --cuda-graph (gendd_fast.cuda_graph_step): refusals and the captured work's host syncs ----
def test_cuda_graph_on_is_refused_on_cpu_in_one_line(tmp_path, teacher_ckpt):
    """``--cuda-graph on`` where it cannot apply stops the run before step 1 with one line that
    names the reason (planted: ``resolve`` ignoring ``on`` let the run train eagerly, no error).
    ``auto``, the default, trains eagerly on the CPU: every other test here runs that way."""
    cfg = tiny_config(tmp_path, "gendd", teacher_ckpt, epochs=1, cuda_graph="on",
                      sample_eval="never")
    with pytest.raises(ValueError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--cuda-graph on cannot apply: ") \
        and "CUDA device" in msg and "cpu" in msg, msg
    assert not os.path.exists(os.path.join(cfg.output, "last.pt"))


def test_cuda_graph_refusal_names_variable_shapes_and_other_blockers():
    """Each blocker gets its own reason, checked as if on a CUDA device (nothing runs there):
    a loader that keeps a short last batch, --skip-bad-images, fp16's scaler, DDP, SGD, a
    reference head, --labeled-fraction below 1. A refusal that missed one would let a capture
    fail mid-run."""
    from types import SimpleNamespace as NS

    from gendd_fast.config import Config
    from gendd_fast.cuda_graph_step import refusal
    cuda = torch.device("cuda", 0)
    FusedDiffLoss = type("FusedDiffLoss", (), {})
    fused = NS(head=FusedDiffLoss())
    fixed = NS(train=NS(train=True))
    base = Config(method="gendd")
    assert refusal(base, cuda, 1, "bf16", fixed, fused) is None
    cases = [
        (dict(), cuda, 1, "bf16", NS(train=NS(train=False)), fused, "short last batch"),
        (dict(skip_bad_images=True), cuda, 1, "bf16", fixed, fused, "--skip-bad-images"),
        (dict(labeled_fraction=0.5), cuda, 1, "bf16", fixed, fused, "--labeled-fraction"),
        (dict(), cuda, 1, "fp16", fixed, fused, "--amp fp16"),
        (dict(), cuda, 2, "bf16", fixed, fused, "2 processes"),
        (dict(opt="sgd"), cuda, 1, "bf16", fixed, fused, "AdamW"),
        (dict(compile=True), cuda, 1, "bf16", fixed, fused, "--compile"),
        (dict(method="kd"), cuda, 1, "bf16", fixed, fused, "--method kd"),
        (dict(), cuda, 1, "bf16", fixed, NS(head=object()), "fused head"),
        (dict(), torch.device("cpu"), 1, "off", fixed, fused, "CUDA device"),
    ]
    for over, dev, world, amp, loaders, distiller, want in cases:
        why = refusal(dataclasses.replace(base, **over), dev, world, amp, loaders, distiller)
        assert why and want in why and "\n" not in why, (over, why)


class _HostSyncGuard(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every read of tensor values by the host: ``_local_scalar_dense`` (``.item()``,
    ``bool()``, ``int()``, ``float()`` of a tensor) and calls of ``.cpu()``, ``.tolist()``,
    ``.numpy()``. On a CUDA device each is a sync, and inside a capture an error. Allowed: the
    Triton interpreter (it stands in for a device launch on the CPU) and the CPU optimizer's host
    step counter (the graphed step makes AdamW capturable, which keeps it on the device)."""
    ALLOWED = ("/triton/", os.sep + os.path.join("torch", "optim") + os.sep)

    def __init__(self):
        super().__init__()
        self.synced = []

    def record(self, what):
        import traceback
        stack = traceback.extract_stack()[:-2]
        if not any(a in f.filename for f in stack for a in self.ALLOWED):
            ours = [f for f in stack if os.sep + "torch" + os.sep not in f.filename]
            self.synced.append(f"{what} at {ours[-1].filename}:{ours[-1].lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


def test_graphed_step_work_never_syncs_with_the_host(tmp_path, teacher_ckpt, monkeypatch):
    """The work the CUDA graph captures (teacher and student forward, the fused head's forward
    and backward through the interpreter, clipping, the AdamW step) run once on the CPU under a
    guard: no host reads of tensor values. Planted: the eager step's ``_has_labels`` check (a
    ``bool()`` of a device tensor) left in GenDD's forward showed up in ``synced``, and so did
    ``float(loss)`` in ``GraphedStep._body``."""
    from gendd_fast.cuda_graph_step import GraphedStep
    from gendd_fast.train import Trainer
    cfg = tiny_config(tmp_path, "gendd", teacher_ckpt, epochs=1, head="fused", clip_grad=1.0,
                      sample_eval="never", batch_size=8, mul=1)
    trainer = Trainer(cfg)
    try:
        trainer.set_up()
        trainer.prepare_loop()
        assert type(trainer.distiller.head).__name__ == "FusedDiffLoss"
        step = GraphedStep(trainer, capturable=False)
        images, labels = next(iter(trainer.loaders.train))
        step._inputs(images, labels)  # outside the graph: decides labels once
        trainer.distiller.graph_mix_weight.fill_(trainer.distiller.draw_mix_weight())
        before = [p.detach().clone() for p in trainer.distiller.head.parameters()]
        guard = _HostSyncGuard()
        for name in ("cpu", "tolist", "numpy"):
            orig = getattr(torch.Tensor, name)

            def spy(self, *a, _orig=orig, _name=name, **k):
                guard.record(f".{_name}()")
                return _orig(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, spy)
        with guard:
            step._body()
        monkeypatch.undo()
        assert guard.synced == [], guard.synced
        assert torch.isfinite(step.terms["loss"]) and set(step.terms) >= {"loss", "diff"}
        after = list(trainer.distiller.head.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the step ran
    finally:
        trainer.release_lock()


# -- the trainer's loop: schedule position, evaluation cadence, best.pt across a resume ---------
def test_each_step_gets_the_schedule_at_its_own_step_and_fractional_epoch(tmp_path, monkeypatch):
    """Step s (1-based) of epoch e trains at lr(g) with g = e * spe + s - 1 its 0-based global
    step (linear warm-up lr (g + 1) / W, then cosine to min_lr, written out here), and hands the
    method the fractional epoch e + s / spe (so the last step of epoch e is at e + 1).
    Planted: the fractional epoch passed one step late -> fails."""
    import math
    seen = []
    real = CE.forward

    def recording(self, images, labels, teacher_out=None, progress=0.0):
        seen.append(progress)
        return real(self, images, labels, teacher_out, progress)

    monkeypatch.setattr(CE, "forward", recording)
    cfg = tiny_config(tmp_path, "ce", epochs=3, lr=0.1, min_lr=0.01, sched="cos",
                      warmup_epochs=1)
    train(cfg)
    spe, total, warm = 4, 12, 4
    assert seen == pytest.approx([e + s / spe for e in range(3) for s in range(1, spe + 1)])
    rows = read_metrics(cfg.output)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    for r in rows:
        g = r["step"] - 1
        want = 0.1 * (g + 1) / warm if g < warm else \
            0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (g - warm) / (total - warm)))
        assert r["lr"] == pytest.approx(want, rel=1e-9), g


def test_eval_every_n_epochs_evaluates_epochs_n_2n_and_the_last(tmp_path):
    """--eval-every 2 over 5 epochs: validation rows for epochs 2 and 4 (1-based), and 5, the
    last, always.
    Planted: the epoch test off by one -> fails."""
    cfg = tiny_config(tmp_path, "ce", epochs=5, eval_every=2, synthetic_size=32)
    train(cfg)
    assert [r["epoch"] for r in read_metrics(cfg.output, "val")] == [2, 4, 5]


def test_best_checkpoint_survives_a_resume_unless_beaten(tmp_path, monkeypatch):
    """best.pt is replaced only by a better score than the best so far, also the best of the
    run before a resume: scores 50, 30 (stop), then 40 after resuming keep epoch 1's best.pt;
    a later 60 replaces it.
    Planted: the best score not restored on resume -> fails."""
    import dataclasses

    import gendd_fast.train as train_mod
    scores = iter([50.0, 30.0, 40.0, 60.0])
    monkeypatch.setattr(train_mod, "evaluate",
                        lambda *a, **kw: {"top1": next(scores), "top5": 100.0, "n": 16})
    cfg = tiny_config(tmp_path, "ce", epochs=4, max_steps=8)
    train(cfg)

    def best_epoch():
        return ckpt_io.read_checkpoint(os.path.join(cfg.output, "best.pt"))["epoch"]

    assert best_epoch() == 1
    train(dataclasses.replace(cfg, max_steps=12, resume="auto"))   # epoch 3 scores 40
    assert best_epoch() == 1
    train(dataclasses.replace(cfg, max_steps=0, resume="auto"))    # epoch 4 scores 60
    assert best_epoch() == 4


def test_plain_torch_load_weights_only_opens_a_fresh_checkpoint(tmp_path):
    """No allow-list needed: the RNG states are tensors and plain numbers. Planted bug checked:
    with NumPy's state stored as np.random.get_state() (the old format) the plain load raised
    UnpicklingError ('Unsupported global')."""
    cfg = tiny_config(tmp_path, "ce", epochs=1, max_steps=2, sample_eval="never")
    train(cfg)
    state = torch.load(os.path.join(cfg.output, "last.pt"), weights_only=True)  # no safe_globals
    assert isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)


def test_rng_states_round_trip_and_old_numpy_tuples_still_restore():
    import random

    import numpy as np
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    s = ckpt_io.rng_state()
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    np.random.randn()  # leaves a cached Gaussian in some NumPy versions: must round trip too
    ckpt_io.set_rng_state(s)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want
    np.random.seed(4)
    old = dict(ckpt_io.rng_state(), numpy=np.random.get_state())  # an old checkpoint's entry
    a = float(np.random.rand())
    ckpt_io.set_rng_state(old)
    assert float(np.random.rand()) == a


def test_trainer_and_evaluate_print_the_same_sampling_number_for_one_checkpoint(
        tmp_path, teacher_ckpt, capsys):
    """One number per checkpoint: the noise is keyed by (seed, image index, draw), not by the
    generator's position. Planted bug checked: with image_ids dropped in evaluate() (the global
    generator's noise, as before) the trainer's and evaluate's sample_top1 disagreed (12.5 vs
    25.0 on these 16 images, seed 3, 2 draws)."""
    from gendd_fast import evaluate
    from gendd_fast.cli import evaluate_main
    cfg = tiny_config(tmp_path, "gendd", teacher_ckpt, epochs=2, sample_eval="end",
                      num_sampling=2, seed=3, eval_every=2)
    res = train(cfg)
    printed = capsys.readouterr()
    assert "sampling: 2 draws, 4 steps, ddpm, guidance 2, temperature 1, noise seed 3" \
        in printed.out
    best = os.path.join(cfg.output, "best.pt")
    got = evaluate.main(["--checkpoint", best, "--device", "cpu"])
    assert got["sample_top1"] == res["best_sample_top1"]
    assert got["sample_top5"] == res["best_sample_top5"]
    small = evaluate.main(["--checkpoint", best, "--device", "cpu", "--batch-size", "4"])
    assert (small["sample_top1"], small["sample_top5"]) == (got["sample_top1"],
                                                            got["sample_top5"])
    out = capsys.readouterr().out
    assert "sampling: 2 draws, 4 steps, ddpm, guidance 2" in out
    table = evaluate_main(["--checkpoint", best, "--device", "cpu", "--table",
                           str(tmp_path / "t.md")])
    assert table["runs"][0]["sample_top1"] == got["sample_top1"]
    assert "2 draws, 4 steps, ddpm, guidance 2" in (tmp_path / "t.md").read_text()


def test_keyed_noise_does_not_depend_on_the_batch():
    from gendd_fast.sampling import image_noises
    x_all, s_all = image_noises(7, torch.arange(6), 1, tokens=2, dim=3, steps=4, device="cpu")
    x_part, s_part = image_noises(7, torch.arange(3, 6), 1, tokens=2, dim=3, steps=4,
                                  device="cpu")
    assert torch.equal(x_all[6:], x_part) and torch.equal(s_all[:, 6:], s_part)
    x_other, _ = image_noises(7, torch.arange(3, 6), 2, tokens=2, dim=3, steps=4, device="cpu")
    assert not torch.equal(x_other, x_part)  # another draw, other noise


def test_max_steps_stop_is_reported_as_interrupted_and_logs_split_data_and_compute(
        tmp_path, capsys):
    """Planted bug checked: with the old plain 'done' line the first assertion failed."""
    cfg = tiny_config(tmp_path, "ce", epochs=3, max_steps=5, sample_eval="never")
    train(cfg)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted by --max-steps 5" in last and "--resume auto" in last
    import json
    with open(os.path.join(cfg.output, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    assert recs[-1]["type"] == "end" and recs[-1]["reason"] == "--max-steps 5"
    for r in read_metrics(cfg.output):
        assert r["data_s"] >= 0 and r["compute_s"] > 0
    done = tiny_config(tmp_path / "b", "ce", epochs=1, sample_eval="never")
    train(done)
    assert "done in" in capsys.readouterr().err.strip().splitlines()[-1]


def test_ddp_is_built_without_the_deprecated_buffer_flag():
    import inspect

    from gendd_fast.train import no_buffer_sync_kwargs
    kw = no_buffer_sync_kwargs()
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    assert list(kw) == (["forward_sync_buffers"] if "forward_sync_buffers" in params
                        else ["broadcast_buffers"]) and list(kw.values()) == [False]
