"""The embedded demo: its table/figure logic on known inputs, and the pipeline at a tiny size."""
import json

import pytest
import torch

from gendd_fast import cli, demo, train


def _runs(key, values):
    return [{key: v} for v in values]


def test_mean_std_is_the_sample_std():
    m, s = demo.mean_std([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and s == pytest.approx(1.0)  # n-1: sqrt(2 / 2)
    assert demo.mean_std([5.0]) == (5.0, 0.0)
    assert demo.mean_std([None, 4.0, 6.0])[0] == pytest.approx(5.0)  # missing runs are skipped
    assert demo.mean_std([]) == (None, None)


def test_metric_reads_final_variants_and_rejects_non_numbers():
    assert demo.metric({"top1": 90.0}, "top1") == 90.0
    assert demo.metric({"top1_last": 91.0, "top1_best": 95.0}, "top1") == 91.0
    assert demo.metric({"last_top1": 92.0}, "top1") == 92.0
    assert demo.metric({"top1": None, "sample_top1": 3.0}, "top1") is None
    assert demo.metric({"top1": True}, "top1") is None


def _known_rows():
    per_seed = {
        "scratch": _runs("top1", [80.0, 82.0, 84.0]),   # 82 +- 2
        "kd": _runs("top1", [85.0, 86.0, 87.0]),        # 86 +- 1: +4 > max(1, 2), beats
        "dkd": _runs("top1", [80.0, 86.0, 92.0]),       # 86 +- 6: +4 < 6, within std
        # GenDD's headline is sampling (83.5 +- 0.5: +1.5 < scratch's std 2, within std)
        "gendd": [{"sample_top1": s, "top1": p} for s, p in ((83.0, 70.0), (83.5, 71.0),
                                                             (84.0, 72.0))],
        "kd-free": _runs("top1", [60.0, 61.0, 62.0]),   # 61 +- 1
        # label-free GenDD against label-free KL: 55 +- 1 is 6 below, more than the std
        "gendd-free": [{"sample_top1": s, "top1": 9.0} for s in (54.0, 55.0, 56.0)],
    }
    return demo.summarize(per_seed, {"top1": 99.5, "top5": 100.0})


def test_summary_rows_compare_each_row_with_its_baseline_beyond_both_stds():
    rows = {r["key"]: r for r in _known_rows()}
    assert list(rows) == ["teacher", "scratch", "kd", "dkd", "gendd", "kd-free", "gendd-free"]
    assert rows["kd"]["headline"] == pytest.approx((86.0, 1.0))
    assert rows["kd"]["beats"] is True and rows["kd"]["gap"] == pytest.approx(4.0)
    assert rows["dkd"]["beats"] is False
    assert rows["gendd"]["headline"] == pytest.approx((83.5, 0.5))
    assert rows["gendd"]["probe"] == pytest.approx((71.0, 1.0))
    assert rows["gendd"]["beats"] is False  # +1.5 is inside scratch's std of 2
    assert rows["gendd-free"]["gap"] == pytest.approx(-6.0)
    assert rows["gendd-free"]["probe"] == (None, None)  # never trained without labels
    assert rows["gendd-free"]["values"] == [54.0, 55.0, 56.0]
    assert rows["scratch"]["beats"] is None and rows["teacher"]["beats"] is None


def test_table_prints_mean_std_scorer_and_verdict_on_the_right_rows():
    table = demo.format_table(_known_rows())
    lines = table.splitlines()
    assert "GenDD linear probe" in lines[0] and "scored by" in lines[0]
    by_row = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
              for line in lines[2:]}
    assert by_row["student (resnet8) + KD"] == ["86.00 +- 1.00", "own classifier", "-",
                                               "+4.00 vs scratch: beats"]
    assert by_row["student (resnet8) + DKD"][3] == "+4.00 vs scratch: within std"
    assert by_row["student (resnet8) + GenDD (sampling)"] == [
        "83.50 +- 0.50", "sampling", "71.00 +- 1.00", "+1.50 vs scratch: within std"]
    assert by_row["student (resnet8) GenDD (sampling, --labels false)"][3] == \
        "-6.00 vs kd-free: below"
    assert by_row["teacher (wrn_16_2, CE)"][0] == "99.50 +- 0.00"
    # only GenDD's own classifier is called a linear probe
    assert "linear probe" not in " ".join(line for line in lines if "KD" in line
                                          and "GenDD" not in line)
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_figure_is_a_png(tmp_path):
    path = demo.plot_comparison(_known_rows(), str(tmp_path / "fig" / "comparison.png"), "t")
    assert path is not None
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eta_counts_the_remaining_stages(tmp_path):
    import io
    out = io.StringIO()
    stages = [dict(name=f"s{i}", output=str(tmp_path / f"s{i}"), method="ce", batch_size=64,
                   epochs=1, dataset="digits") for i in range(3)]
    progress = demo.Progress([("stage", st) for st in stages], out=out)
    progress.t0 -= 10.0  # pretend the first stage took 10 s
    progress.done(stages[0], 10.0)
    text = out.getvalue()
    assert "stage 1 of 3 done" in text and "min left" in text
    left = float(text.split("about ")[1].split(" min")[0])
    assert left == pytest.approx(2 * 10.0 / 60, abs=0.05)  # two equal stages to go


def test_a_stage_writes_its_output_to_its_log_not_the_terminal(tmp_path, capsys):
    fields = dict(name="s", output=str(tmp_path / "s"), method="ce", batch_size=64, epochs=1,
                  dataset="digits")

    def fake_train(cfg):
        print("inside the stage")
        return {"top1": 1.0}
    res = demo.run_logged(fields, fake_train)
    assert res["top1"] == 1.0 and res["cpu_s"] >= 0
    assert "inside the stage" in open(tmp_path / "s" / "stage.log").read()
    assert "inside the stage" not in capsys.readouterr().out


# One epoch per stage on 8x8 digits, with a resnet8 teacher and a 2-setting steps sweep: the
# whole pipeline in well under a minute.
TINY = dict(teacher="resnet8", teacher_epochs=1, epochs={k: 1 for k in demo.EPOCHS},
            sampling_steps="4", image_size=8, sweep={"ddpm": [4], "ddim": [2]}, quiet=True,
            workers=0)


@pytest.fixture
def one_thread():
    """The workers' thread count for the in-process run too, so both runs compute alike."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tiny_demo_prints_both_tables_and_is_deterministic(tmp_path, capsys, one_thread):
    summary = demo.run_demo(output=str(tmp_path / "a"), seeds=(0,), **TINY)
    out = capsys.readouterr().out
    for row in ("teacher (resnet8, CE)", "from scratch", "+ KD", "+ DKD", "+ GenDD (sampling)",
                "KL (--method kd --labels false)", "GenDD (sampling, --labels false)",
                "vs baseline", "sampling top-1", "ms per image", "DDIM", "Figure:"):
        assert row in out
    assert [r["key"] for r in summary["rows"]] == [k for k, _, _ in demo.ROWS]
    for key in ("scratch", "kd", "dkd", "gendd", "kd-free", "gendd-free"):
        assert len(summary["per_seed"][key]) == 1
    gendd = summary["per_seed"]["gendd"][0]
    assert 0 <= gendd["sample_top1"] <= 100 and 0 <= gendd["top1"] <= 100
    assert [(s["sampler"], s["steps"]) for s in summary["steps_sweep"]] == [("ddpm", 4),
                                                                           ("ddim", 2)]
    assert all(s["ms"][0] > 0 for s in summary["steps_sweep"])
    assert summary["teacher"]["top1"] > 15  # a real classifier after one epoch on the digits
    env = summary["environment"]
    assert env["torch_threads"] >= 1 and env["torch"] and "commit" in env
    with open(summary["figure"], "rb") as fh:
        assert fh.read(4) == b"\x89PNG"
    saved = json.load(open(tmp_path / "a" / "results.json"))
    assert saved["per_seed"] == summary["per_seed"]
    scratch_log = open(tmp_path / "a" / "seed0" / "scratch" / "stage.log").read()
    assert "--labeled-fraction 0.1" in scratch_log and "| held-out accuracy" in scratch_log
    table = open(tmp_path / "a" / "results.md").read()
    assert demo.format_table(demo.summarize(summary["per_seed"], summary["teacher"]),
                             "resnet8") in table
    # Determinism: the students rerun in a fresh folder on two worker processes (reusing run
    # a's teacher, whose accuracy is read back from its log) give the same numbers.
    again = demo.run_demo(output=str(tmp_path / "b"), seeds=(0,),
                          reuse_teacher=str(tmp_path / "a" / "teacher"),
                          **{**TINY, "sweep": {}, "workers": 2})
    assert again["teacher"] == summary["teacher"]
    assert again["per_seed"] == summary["per_seed"]


def test_run_demo_rejects_no_seeds(tmp_path):
    with pytest.raises(ValueError, match="at least one seed"):
        demo.run_demo(output=str(tmp_path), seeds=())


def test_reusing_a_missing_teacher_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained teacher in"):
        demo.run_demo(output=str(tmp_path / "x"), reuse_teacher=str(tmp_path / "nowhere"))


def test_a_signal_during_a_stage_stops_the_demo(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg):  # the trainer's answer to a SIGTERM: a clean return, flagged
        calls.append(cfg.output)
        return {"top1": 10.0, "top5": 50.0, "stopped_by_signal": 15}
    monkeypatch.setattr(train, "train", fake_train)
    with pytest.raises(SystemExit, match="stopped by signal 15 during teacher"):
        demo.run_demo(output=str(tmp_path / "d"), workers=0)
    assert len(calls) == 1  # no student was started after the teacher was interrupted


def test_no_arguments_runs_the_demo(monkeypatch):
    called = {}
    monkeypatch.setattr(demo, "run_demo", lambda: called.setdefault("demo", True))
    cli.train_main([])
    assert called == {"demo": True}
