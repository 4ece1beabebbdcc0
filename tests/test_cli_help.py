"""`--help` explains every flag, grouped, with the default that would really be used."""
import dataclasses
import re

from gendd_fast.config import FLAG_GROUPS, Config, build_parser


def _help(argv=None):
    return build_parser(argv).format_help()


def _flag_help(text, flag):
    """The help text printed for one flag (argparse may wrap it over several lines)."""
    m = re.search(rf"^  {re.escape(flag)}\b[^\n]*(?:\n {{6,}}[^\n]*)*", text, re.M)
    assert m, f"{flag} missing from --help"
    return " ".join(m.group(0).split())


def test_every_config_field_has_exactly_one_group_and_a_help_text():
    listed = [name for _, helps in FLAG_GROUPS for name in helps]
    fields = [f.name for f in dataclasses.fields(Config)]
    assert sorted(listed) == sorted(fields)
    assert len(listed) == len(set(listed))
    assert all(len(text) > 10 for _, helps in FLAG_GROUPS for text in helps.values())


def test_help_prints_a_line_with_a_real_default_for_every_flag():
    text = _help()
    for f in dataclasses.fields(Config):
        line = _flag_help(text, "--" + f.name.replace("_", "-"))
        assert "(default: " in line and "default: None)" not in line, line
    # resolved values are shown, not the 'None' placeholders of dataset-dependent fields
    assert "(default: 32)" in _flag_help(text, "--image-size")
    assert "(default: 30)" in _flag_help(text, "--mul")
    for title in ("data:", "model:", "method:", "GenDD head and sampling:", "optimisation:",
                  "precision and speed:", "run and checkpoints:"):
        assert "\n" + title in text


def test_help_with_a_recipe_shows_the_recipe_values():
    text = _help(["--config", "imagenet_r34_r18", "--help"])
    assert "(default: 224)" in _flag_help(text, "--image-size")
    assert "(default: 10)" in _flag_help(text, "--mul")
    assert "(default: imagenet" not in _flag_help(text, "--dataset")  # a kind, not the recipe name
    assert "imagenet_r34_r18" in text


def test_help_under_dataset_imagefolder_prints_the_defaults_that_run_uses(tmp_path):
    """Planted bug checked: with only the recipes read (the old _effective_defaults), this
    printed 32/32/30 and failed."""
    from gendd_fast.config import config_from_args
    argv = ["--dataset", "imagefolder", "--data-path", str(tmp_path), "--method", "ce"]
    text = _help(argv + ["--help"])
    cfg = config_from_args(argv)[0].resolved()  # what the run resolves
    assert (cfg.image_size, cfg.val_resize, cfg.mul) == (224, 256, 10)
    for flag, value in (("--image-size", cfg.image_size), ("--val-resize", cfg.val_resize),
                        ("--mul", cfg.mul), ("--eval-batch-size", cfg.eval_batch_size)):
        assert f"(default: {value})" in _flag_help(text, flag), flag
    # a flag given on the command line feeds what depends on it
    text = _help(["--dataset", "imagefolder", "--image-size", "64", "--help"])
    assert "(default: 73)" in _flag_help(text, "--val-resize")


def test_help_still_prints_when_a_flag_value_is_malformed():
    text = _help(["--dataset", "imagefolder", "--epochs", "many", "--help"])
    assert "(default: 32)" in _flag_help(text, "--image-size")  # fell back to the built-ins
