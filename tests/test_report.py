"""The accuracy table (several checkpoints -> one table, mean +- std over seeds), the
steps sweep, and the recipes behind the README's table of published rows."""
import csv
import os
import statistics

import pytest

from gendd_fast.cli import evaluate_main
from gendd_fast.config import config_from_args
from gendd_fast.report import group_runs, markdown_table, wants_report
from gendd_fast.train import train
from helpers import save_teacher, tiny_config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    teacher, _ = save_teacher(root)
    out = {}
    for name, method, seed in (("g0", "gendd", 0), ("g1", "gendd", 1), ("kd", "kd", 0)):
        cfg = tiny_config(root / name, method, teacher, epochs=1, seed=seed,
                          sample_eval="never")
        train(cfg)
        out[name] = os.path.join(cfg.output, "last.pt")
    return out


def test_wants_report():
    assert not wants_report(["--checkpoint", "a.pt", "--cfg", "2"])
    assert wants_report(["--checkpoint", "a.pt", "b.pt"])
    assert wants_report(["--checkpoint", "a.pt", "--checkpoint", "b.pt"])
    assert wants_report(["--checkpoint", "a.pt", "--steps-sweep"])
    assert wants_report(["--checkpoint", "a.pt", "--table", "t.md"])


def test_table_rows_are_means_and_stds_of_single_evaluations(runs, tmp_path):
    single = {k: evaluate_main(["--checkpoint", p, "--device", "cpu"]) for k, p in runs.items()}
    md, csv_path = str(tmp_path / "t.md"), str(tmp_path / "t.csv")
    res = evaluate_main(["--checkpoint", runs["g0"], runs["kd"], runs["g1"], "--device", "cpu",
                   "--table", md, "--csv", csv_path])
    rows = {r["method"]: r for r in res["recipes"]}
    assert len(res["recipes"]) == 2 and rows["gendd"]["runs"] == 2 and rows["kd"]["runs"] == 1
    for key in ("top1", "top5", "sample_top1", "sample_top5"):
        vals = [single["g0"][key], single["g1"][key]]
        assert rows["gendd"][key] == pytest.approx(statistics.fmean(vals))
        assert rows["gendd"][key + "_std"] == pytest.approx(statistics.stdev(vals))
    assert rows["kd"]["top1"] == pytest.approx(single["kd"]["top1"])
    assert rows["kd"]["sample_top1"] is None  # a baseline has no sampling accuracy
    assert rows["gendd"]["pair"] == "resnet8 -> resnet8"
    text = open(md).read()
    assert "| gendd | resnet8 -> resnet8 | synthetic | 2 |" in text and "+-" in text
    with open(csv_path) as fh:
        kinds = [r["kind"] for r in csv.DictReader(fh)]
    assert kinds.count("recipe") == 2 and kinds.count("run") == 3


def test_steps_sweep_times_every_setting_and_matches_evaluate(runs, tmp_path):
    res = evaluate_main(["--checkpoint", runs["g0"], "--steps-sweep", "--sweep-ddpm", "4", "2",
                   "--sweep-ddim", "3", "--device", "cpu", "--table", str(tmp_path / "s.md")])
    sweep = res["runs"][0]["sweep"]
    assert [(s["sampler"], s["steps"]) for s in sweep] == [("ddpm", 4), ("ddpm", 2),
                                                          ("ddim", 3)]
    assert all(s["seconds"] > 0 and s["n"] == 16 for s in sweep)
    for s, flags in ((sweep[1], ["--sampling-steps", "2"]), (sweep[2], ["--ddim-steps", "3"])):
        alone = evaluate_main(["--checkpoint", runs["g0"], "--device", "cpu", *flags])
        assert s["sample_top1"] == pytest.approx(alone["sample_top1"])
    assert "| DDIM | 3 |" in open(tmp_path / "s.md").read()


def test_markdown_of_a_single_run_has_no_std():
    rows = group_runs([dict(recipe="a", method="kd", pair="x -> y", dataset="d", seed=0,
                            checkpoint="c", sampler="", top1=70.0, top5=90.0)])
    assert "| kd | x -> y | d | 1 | - | - | 70.00 | 90.00 |" in markdown_table(rows)


# Every recipe the README's "Reproducing the paper's table" names exists and loads.
def _readme_section():
    text = open(README).read()
    start = text.index("## Reproducing the paper's table")
    return text[start:text.index("\n## ", start + 5)]


def test_readme_rows_name_recipes_that_load():
    section = _readme_section()
    names = sorted({w.strip("`") for w in section.split() if w.strip("`").endswith(".yaml")})
    assert len(names) >= 10
    for name in names:
        cfg, _ = config_from_args(["--config", name[:-5], "--teacher", "resnet34"]) \
            if "stage1" in name else config_from_args(["--config", name[:-5]])
        assert cfg.method in ("gendd", "gendd-pretrain", "kd", "dkd", "ikl")
    for published in ("72.38", "73.78", "82.34", "71.24", "71.91", "71.44", "73.19", "81.68",
                      "81.83", "67.89", "51.60", "66.90"):
        assert published in section, published


def test_a_seed_trained_with_overwrite_has_the_same_recipe_key():
    """The report's recipe and the run's identity come from one declaration (config.option):
    --overwrite, --shot-split and --num-sampling decide how a run is written or evaluated, not
    what it trains, so a seed rerun with --overwrite is a seed of the same recipe. Planted: the
    old hand-kept NOT_RECIPE (which lacked overwrite) put that seed in a row of its own."""
    import dataclasses
    from gendd_fast.config import NOT_RECIPE, RUN_IDENTITY_EXCLUDED, Config
    from gendd_fast.report import recipe_key
    a = dataclasses.asdict(Config(seed=0))
    b = dataclasses.asdict(Config(seed=1, overwrite=True, output="runs/other"))
    assert recipe_key(a) == recipe_key(b)
    assert recipe_key(a) != recipe_key(dataclasses.asdict(Config(seed=0, lr=2e-3)))
    # the recipe is the run's identity less the seed and the device
    assert NOT_RECIPE == RUN_IDENTITY_EXCLUDED | {"seed", "device"}
