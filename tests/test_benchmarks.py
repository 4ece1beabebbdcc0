"""The benchmark scripts run end to end (tiny shapes, CPU, interpreter) and write their JSON.

These check that the scripts work, not speed: timings on CPU through the interpreter mean
nothing, and performance claims come only from full runs recorded under benchmarks/results/.
"""
import glob
import json
import os
import runpy

import pytest

# The interpreter computes bf16 wrongly (overflow warnings from numpy): these runs check that the
# scripts work end to end, never the numbers.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run(script, argv, out):
    mod = runpy.run_path(os.path.join(BENCH, script), run_name="bench")
    rows = mod["main"](argv + ["--out", str(out)])
    files = glob.glob(os.path.join(str(out), "*.json"))
    assert len(files) == 1
    rec = json.load(open(files[0]))
    assert rec["results"] == json.loads(json.dumps(rows))
    assert {"device", "torch"} <= set(rec["environment"]) and rec["command"] and rec["date"]
    return rows


def test_bench_sampler(tmp_path):
    rows = run("bench_sampler.py", ["--device", "cpu", "--images", "2", "--steps", "3",
                                    "--width", "32", "--repeats", "1", "--shapes", "cifar"],
               tmp_path)
    names = [r["variant"] for r in rows]
    assert names == ["reference fp32", "reference bf16 autocast", "extension fp32",
                     "extension bf16"]
    assert rows[2]["max_rel_diff_vs_fp32_ref"] < 1e-4


def test_bench_head(tmp_path):
    rows = run("bench_head.py", ["--device", "cpu", "--scale", "0.01", "--width", "32",
                                 "--repeats", "1", "--shapes", "cifar", "--no-compile",
                                 "--mul", "1"], tmp_path)
    assert [r["variant"] for r in rows] == ["reference fp32", "reference bf16", "fused bf16"]
    assert all(r["ms"] > 0 for r in rows)


def test_bench_train(tmp_path):
    rows = run("bench_train.py", ["--device", "cpu", "--shapes", "cifar", "--batch", "2",
                                  "--width", "32", "--steps", "1", "--mul", "1"], tmp_path)
    assert rows[1]["head"] == "FusedDiffLoss" and all(r["images_per_s"] > 0 for r in rows)


def test_bench_data(tmp_path):
    rows = run("bench_data.py", ["--device", "cpu", "--images", "16", "--batch", "4",
                                 "--workers", "1", "--root", str(tmp_path / "jpegs")],
               tmp_path / "out")
    assert rows[0]["loader"].startswith("DALI") and rows[-1]["workers_or_threads"] == 1
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("script,baseline", [("bench_sampler.py", "reference"),
                                             ("bench_head.py", "reference"),
                                             ("bench_train.py", "reference"),
                                             ("bench_data.py", "DataLoader"),
                                             ("step_accounting.py", "reference")])
def test_help_names_the_baseline(script, baseline, capsys):
    mod = runpy.run_path(os.path.join(BENCH, script), run_name="bench")
    with pytest.raises(SystemExit):
        mod["main"](["--help"])
    assert baseline in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(os.path.basename(p) for p in glob.glob(
    os.path.join(BENCH, "*.py")) if os.path.basename(p) != "common.py"))
def test_every_benchmark_script_imports_and_answers_help(script, capsys):
    """A script whose imports broke (precision_compare.py once imported a removed demo helper)
    fails here, not on the day someone reruns it."""
    mod = runpy.run_path(os.path.join(BENCH, script), run_name="bench")
    with pytest.raises(SystemExit) as e:
        mod["main"](["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
