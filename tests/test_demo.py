"""The embedded demo: its table/figure logic on known inputs, and the pipeline at a tiny size."""
import json

import pytest

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
        "kd": _runs("top1", [85.0, 86.0, 87.0]),        # 86 +- 1: +4 > 1, beats
        "dkd": _runs("top1", [80.0, 86.0, 92.0]),       # 86 +- 6: +4 < 6, does not
        # GenDD's headline is sampling (83.5 +- 0.5: +1.5 > 0.5, beats); its probe is lower
        "gendd": [{"sample_top1": s, "sample_top5": 99.0, "top1": p, "top5": 98.0}
                  for s, p in ((83.0, 70.0), (83.5, 71.0), (84.0, 72.0))],
    }
    for r in per_seed["scratch"] + per_seed["kd"] + per_seed["dkd"]:
        r["top5"] = 100.0
    return demo.summarize(per_seed, {"top1": 99.5, "top5": 100.0})


def test_summary_rows_mark_what_beats_scratch_by_more_than_its_std():
    rows = {r["key"]: r for r in _known_rows()}
    assert list(rows) == ["teacher", "scratch", "kd", "dkd", "gendd"]
    assert rows["kd"]["headline"] == pytest.approx((86.0, 1.0))
    assert rows["kd"]["beats_scratch"] is True
    assert rows["dkd"]["beats_scratch"] is False
    assert rows["gendd"]["headline"] == pytest.approx((83.5, 0.5))
    assert rows["gendd"]["probe"] == pytest.approx((71.0, 1.0))
    assert rows["gendd"]["beats_scratch"] is True
    assert rows["scratch"]["beats_scratch"] is None and rows["teacher"]["beats_scratch"] is None


def test_table_prints_mean_std_and_the_mark_on_the_right_rows():
    table = demo.format_table(_known_rows())
    lines = table.splitlines()
    assert "beats scratch" in lines[0] and "GenDD linear probe" in lines[0]
    by_row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
              for line in lines[2:]}
    assert by_row["student (resnet8) + KD"] == ["86.00 +- 1.00", "100.00 +- 0.00", "-", "yes"]
    assert by_row["student (resnet8) + DKD"][3] == "no"
    assert by_row["student (resnet8) + GenDD (sampling)"] == [
        "83.50 +- 0.50", "99.00 +- 0.00", "71.00 +- 1.00", "yes"]
    assert by_row["student (resnet8) from scratch (CE)"][0] == "82.00 +- 2.00"
    assert by_row["teacher (wrn_16_2, CE)"][0] == "99.50 +- 0.00"
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_figure_is_a_png(tmp_path):
    path = demo.plot_comparison(_known_rows(), str(tmp_path / "fig" / "comparison.png"), "t")
    assert path is not None
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# One epoch per stage on 16x16 digits, with a resnet8 teacher: seconds, not minutes.
TINY = dict(teacher="resnet8", teacher_epochs=1, student_epochs=1, stage1_epochs=1,
            sampling_steps="4", image_size=16, quiet=True)


def test_tiny_demo_prints_the_table_and_is_deterministic(tmp_path, capsys):
    summary = demo.run_demo(output=str(tmp_path / "a"), seeds=(0,), **TINY)
    out = capsys.readouterr().out
    for row in ("teacher (resnet8, CE)", "from scratch", "+ KD", "+ DKD", "+ GenDD (sampling)",
                "beats scratch", "Figure:"):
        assert row in out
    assert [r["key"] for r in summary["rows"]] == ["teacher", "scratch", "kd", "dkd", "gendd"]
    for key in ("scratch", "kd", "dkd", "gendd"):
        assert len(summary["per_seed"][key]) == 1
    gendd = summary["per_seed"]["gendd"][0]
    assert 0 <= gendd["sample_top1"] <= 100 and 0 <= gendd["top1"] <= 100
    assert summary["teacher"]["top1"] > 20  # a real classifier after one epoch on the digits
    with open(summary["figure"], "rb") as fh:
        assert fh.read(4) == b"\x89PNG"
    saved = json.load(open(tmp_path / "a" / "results.json"))
    assert saved["per_seed"] == summary["per_seed"]
    table = open(tmp_path / "a" / "results.md").read().strip()
    assert table in out
    # Determinism: the students rerun in a fresh folder (reusing run a's teacher, whose accuracy
    # is read back from its log) print the same table.
    again = demo.run_demo(output=str(tmp_path / "b"), seeds=(0,),
                          reuse_teacher=str(tmp_path / "a" / "teacher"), **TINY)
    assert again["teacher"] == summary["teacher"]
    assert again["per_seed"] == summary["per_seed"]
    assert open(tmp_path / "b" / "results.md").read().strip() == table


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
        demo.run_demo(output=str(tmp_path / "d"))
    assert len(calls) == 1  # no student was started after the teacher was interrupted


def test_no_arguments_runs_the_demo(monkeypatch):
    called = {}
    monkeypatch.setattr(demo, "run_demo", lambda: called.setdefault("demo", True))
    cli.train_main([])
    assert called == {"demo": True}
