"""The paper's evaluation protocol: best.pt chosen by sampling top-1 for GenDD, the final
evaluation of best.pt (and the last model) with --num-sampling draws, the end-of-run table, and
the many/medium/few-shot split for long-tailed data."""
import os

import pytest
import torch
from PIL import Image

import gendd_fast.train as train_mod
from gendd_fast.evaluate import evaluate, format_results, training_class_counts
from gendd_fast.train import Trainer, train
from helpers import save_teacher, tiny_config


# -- the shot split -------------------------------------------------------------------------------
class FixedPredictions(torch.nn.Module):
    """Predicts class ``pred[i]`` for the i-th image it is shown (and its opposite by 'sampling')."""

    def __init__(self, pred, k):
        super().__init__()
        self.pred, self.k, self.i = pred, k, 0

    def eval_logits(self, x, ctx, sample=False, **_):
        p = torch.tensor(self.pred[self.i:self.i + x.shape[0]])
        self.i += x.shape[0]
        out = {"": torch.nn.functional.one_hot(p, self.k).float()}
        if sample:
            out["sample_"] = torch.nn.functional.one_hot((p + 1) % self.k, self.k).float()
        return out


def test_shot_split_groups_and_weights():
    # training counts at the group edges: 101 many; 100 and 20 medium; 19 few
    counts = torch.tensor([101, 100, 20, 19])
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    pred = [0, 0, 1, 1, 0, 0, 3, 0, 0, 0]   # hits: class 0 2/3, 1 1/2, 2 0/1, 3 1/4
    loader = [(torch.zeros(6, 1), y[:6]), (torch.zeros(4, 1), y[6:])]
    res = evaluate(FixedPredictions(pred, 4), loader, torch.device("cpu"), sample=True,
                   class_counts=counts)
    assert res["top1"] == pytest.approx(40.0)
    assert res["many"] == pytest.approx(200 / 3)
    assert res["medium"] == pytest.approx(100 / 3)   # images of the group, not a mean of classes
    assert res["few"] == pytest.approx(25.0)
    # the 'sampling' head predicts p + 1: scored under its own keys
    hits = [(int(t) == (p + 1) % 4) for t, p in zip(y, pred)]
    assert res["sample_top1"] == pytest.approx(100 * sum(hits) / 10)
    assert {"sample_many", "sample_medium", "sample_few"} <= set(res)
    plain = evaluate(FixedPredictions(pred, 4), loader, torch.device("cpu"))
    assert "many" not in plain


def _png_list(root, name, counts):
    lines = []
    for c, n in enumerate(counts):
        path = os.path.join(root, f"c{c}.png")
        if not os.path.exists(path):
            Image.new("RGB", (20, 20), (40 * c, 255 - 40 * c, 90)).save(path)
        lines += [f"c{c}.png {c}"] * n
    with open(os.path.join(root, name), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return name


def test_long_tailed_run_reports_the_split(tmp_path, capsys):
    root = str(tmp_path)
    train_list = _png_list(root, "train.txt", [101, 20, 5])
    val_list = _png_list(root, "val.txt", [3, 2, 1])
    cfg = tiny_config(tmp_path, "ce", dataset="filelist", data_path=root, train_list=train_list,
                      val_list=val_list, num_classes=3, batch_size=32, epochs=1)
    assert training_class_counts(cfg).tolist() == [101, 20, 5]
    res = train(cfg)
    assert all(0 <= res[k] <= 100 for k in ("many", "medium", "few", "best_many"))
    table = capsys.readouterr().out
    assert "classifier many-shot top-1" in table and "few-shot" in table  # a CE run
    off = tiny_config(tmp_path, "ce", dataset="filelist", data_path=root, train_list=train_list,
                      val_list=val_list, shot_split="off")
    assert training_class_counts(off) is None
    balanced = _png_list(root, "balanced.txt", [30, 30, 30])
    assert training_class_counts(tiny_config(tmp_path, "ce", dataset="filelist", data_path=root,
                                             train_list=balanced, val_list=val_list)) is None
    with pytest.raises(ValueError, match="--shot-split on needs"):
        training_class_counts(tiny_config(tmp_path, "ce", shot_split="on"))


# -- what picks best.pt and what the final evaluation scores --------------------------------------
SCRIPT = [dict(top1=50.0, sample=10.0), dict(top1=10.0, sample=60.0), dict(top1=30.0, sample=20.0)]


@pytest.fixture
def scripted_eval(monkeypatch):
    """Evaluation returns scripted accuracies and records what it was asked and on which
    weights (a fingerprint of the student's parameters)."""
    calls = []

    def fake(distiller, loader, device, amp="off", sample=False, sample_kw=None,
             class_counts=None, **_):
        i = len(calls)
        fp = sum(float(p.detach().double().sum()) for p in distiller.student.parameters())
        calls.append(dict(sample=sample, draws=(sample_kw or {}).get("num_sampling"), fp=fp))
        v = SCRIPT[i] if i < len(SCRIPT) else dict(top1=70.0 + i, sample=80.0 + i)
        res = {"n": 16, "top1": v["top1"], "top5": 100.0}
        if sample:
            res.update(sample_top1=v["sample"], sample_top5=100.0)
        return res
    monkeypatch.setattr(train_mod, "evaluate", fake)
    return calls


def _fp(distiller):
    return sum(float(p.detach().double().sum()) for p in distiller.student.parameters())


def test_gendd_best_by_sampling_final_on_best_with_draws(tmp_path, scripted_eval, capsys):
    teacher, _ = save_teacher(tmp_path)
    t = Trainer(tiny_config(tmp_path, "gendd", teacher, epochs=3, sample_eval="every",
                            num_sampling=3))
    res = t.run()
    calls = scripted_eval
    assert [c["sample"] for c in calls] == [True] * 5
    assert [c["draws"] for c in calls] == [1, 1, 1, 3, 3]   # 1 draw while training, then 3
    assert res["best_epoch"] == 2 and res["selected_by"] == "sample_top1"
    assert calls[3]["fp"] == calls[2]["fp"]      # the last model
    assert calls[4]["fp"] == calls[1]["fp"]      # best.pt: epoch 2's weights, loaded
    assert res["sample_top1"] == 83.0 and res["best_sample_top1"] == 84.0
    assert res["top1"] == 73.0 and res["best_top1"] == 74.0
    assert _fp(t.distiller) == calls[2]["fp"]    # the trained model is left as it ended
    best = torch.load(os.path.join(t.cfg.output, "best.pt"), weights_only=False)
    assert best["epoch"] == 2
    out = capsys.readouterr().out
    assert "sampling (3 draws) top-1" in out and "|    83.00 |    84.00 |" in out
    assert "best.pt: epoch 2, chosen by sampling top-1" in out


def test_sample_eval_end_picks_by_probe_then_samples_best(tmp_path, scripted_eval):
    teacher, _ = save_teacher(tmp_path)
    res = train(tiny_config(tmp_path, "gendd", teacher, epochs=3, sample_eval="end",
                            num_sampling=2))
    calls = scripted_eval
    assert [c["sample"] for c in calls] == [False, False, False, True, True]
    assert res["best_epoch"] == 1 and res["selected_by"] == "top1"
    assert calls[4]["fp"] == calls[0]["fp"] and calls[4]["draws"] == 2


def test_unsupervised_gendd_is_selected_by_sampling(tmp_path, scripted_eval):
    teacher, _ = save_teacher(tmp_path)
    res = train(tiny_config(tmp_path, "gendd", teacher, epochs=3, labels=False, smooth=0.0,
                            sample_eval="end"))
    assert [c["sample"] for c in scripted_eval][:3] == [True] * 3
    assert res["best_epoch"] == 2 and res["selected_by"] == "sample_top1"


def test_other_methods_report_last_and_best_probe(tmp_path, scripted_eval):
    res = train(tiny_config(tmp_path, "ce", epochs=3))
    assert len(scripted_eval) == 3 and not any(c["sample"] for c in scripted_eval)
    assert res["best_epoch"] == 1 and res["best_top1"] == 50.0 and res["top1"] == 30.0


def test_table_lists_last_and_best():
    text = format_results({"top1": 1.0, "top5": 2.0, "sample_top1": 3.0, "best_top1": 4.0,
                           "best_sample_top1": 5.0, "best_epoch": 7, "few": None},
                          draws=5, selected_by="sample_top1")
    lines = text.splitlines()
    assert lines[2].startswith("| sampling (5 draws) top-1") and lines[2].endswith(
        "|     3.00 |     5.00 |")
    assert any(r.startswith("| linear probe top-1") and r.endswith("|     1.00 |     4.00 |")
               for r in lines)
    assert any("few-shot" in r and r.endswith("|        - |        - |") for r in lines)
    assert lines[-1] == "best.pt: epoch 7, chosen by sampling top-1"


def test_classes_a_training_list_never_names_count_zero(tmp_path):
    """A long-tailed list whose last classes have no training image: their counts are 0 up to
    the model's class count (they fall in the few-shot group), not missing."""
    root = str(tmp_path)
    train_list = _png_list(root, "train.txt", [101, 20, 5])
    cfg = tiny_config(tmp_path, "ce", dataset="filelist", data_path=root, train_list=train_list,
                      val_list=train_list)
    assert training_class_counts(cfg, 5).tolist() == [101, 20, 5, 0, 0]
    assert training_class_counts(cfg).tolist() == [101, 20, 5, 0]  # --num-classes 4


def test_balanced_list_with_an_empty_class_reports_no_shot_split(tmp_path):
    """--shot-split auto reports the split for a long-tailed list: some class with more than
    100 images and some *trained* class with fewer than 20. A class with no image at all is no
    evidence of a long tail: a balanced list of 101 per class plus an empty class (named by
    --num-classes) gets no split, and an explicit --shot-split on still counts it as 0.
    Planted: zero-image classes counted as few-shot -> fails."""
    root = str(tmp_path)
    train_list = _png_list(root, "train.txt", [101, 101, 101])
    cfg = tiny_config(tmp_path, "ce", dataset="filelist", data_path=root, train_list=train_list,
                      val_list=train_list, num_classes=4)
    assert training_class_counts(cfg) is None
    assert training_class_counts(cfg, 5) is None
    on = tiny_config(tmp_path, "ce", dataset="filelist", data_path=root, train_list=train_list,
                     val_list=train_list, num_classes=4, shot_split="on")
    assert training_class_counts(on).tolist() == [101, 101, 101, 0]
    tail = _png_list(root, "tail.txt", [101, 101, 5])
    lt = tiny_config(tmp_path, "ce", dataset="filelist", data_path=root, train_list=tail,
                     val_list=tail, num_classes=4)
    assert training_class_counts(lt).tolist() == [101, 101, 5, 0]


def test_a_classifier_is_not_called_a_linear_probe_without_sampling(tmp_path, capsys):
    """A CE / KD / DKD student's own classifier is no linear probe (GenDD's is: trained on
    detached features beside the generative head), in the end-of-run table and in the
    per-epoch line. Planted: the label 'linear probe' for every method -> fails."""
    text = format_results({"top1": 1.0, "top5": 2.0, "best_top1": 4.0, "best_epoch": 3},
                          selected_by="top1")
    assert "linear probe" not in text and "| classifier top-1" in text
    assert text.splitlines()[-1] == "best.pt: epoch 3, chosen by classifier top-1"
    train(tiny_config(tmp_path, "ce", epochs=1))
    err = capsys.readouterr().err
    assert "held-out classifier top-1" in err and "linear-probe" not in err
