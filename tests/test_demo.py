"""The embedded default pipeline (shortened: one epoch per stage, 4 sampling steps)."""
import json

from gendd_fast import cli, demo


def test_demo_prints_the_comparison_table(tmp_path, capsys):
    summary = demo.run_demo(output=str(tmp_path / "demo"), epochs=1, sampling_steps="4",
                            quiet=True)
    out = capsys.readouterr().out
    for row in ("teacher (wrn_16_2, CE)", "from scratch", "+ KD", "+ GenDD"):
        assert row in out
    rows = {r["row"]: r for r in summary["rows"]}
    assert len(rows) == 4
    gendd = rows["student (resnet8) + GenDD"]
    assert 0 <= gendd["sample_top1"] <= 100 and 0 <= gendd["top1"] <= 100
    # the teacher is a real classifier after one epoch on the digits (chance: 10%). One epoch of
    # warm-up leaves it at 25-30%, and which side of that it lands on moves with any change of
    # rounding (decaying the BatchNorm parameters, as the reference does, moved 30.4 to 27.6)
    assert rows["teacher (wrn_16_2, CE)"]["top1"] > 20
    saved = json.load(open(tmp_path / "demo" / "results.json"))
    assert saved["rows"] == summary["rows"]


def test_no_arguments_runs_the_demo(monkeypatch):
    called = {}
    monkeypatch.setattr(demo, "run_demo", lambda: called.setdefault("demo", True))
    cli.train_main([])
    assert called == {"demo": True}
