"""The numeric validator and config type checks (gendd_fast/validation.py, config.validate).
Each test failed on main, as its docstring says: NaN passed every `x < lo` range check, and
wrong-typed YAML values gave a bare TypeError naming no field."""
import math
import os
import subprocess
import sys

import pytest

from gendd_fast.config import config_from_args, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cfg_nan_on_the_command_line_is_refused_in_one_line(tmp_path):
    """`--cfg nan` was accepted on main and a meaningless sampling accuracy reported."""
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train", "--cfg", "nan", "--teacher",
                        "resnet8", "--output", str(tmp_path / "run")], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --cfg") and "nan (float)" in line and "at least 0" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--temperature", "--weight-decay", "--min-lr", "--decay-rate",
                                  "--warmup-epochs", "--beta", "--mixup", "--cfg", "--lr",
                                  "--kd-alpha", "--clip-grad"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_with_the_field_named(flag, value):
    """Every numeric flag, through the CLI's parser: on main NaN passed the range checks of all
    of these (and inf passed --temperature, which is 'positive')."""
    with pytest.raises(ValueError) as e:
        config_from_args(["--method", "ce", f"{flag}={value}"])
    msg = str(e.value)
    assert msg.startswith(flag) and "(float)" in msg and "NaN and Inf" in msg


def test_validator_states_range_name_value_and_type():
    from gendd_fast.validation import ConfigValueError, check_number, interval
    assert check_number("lr", 0.5, interval(0)) == 0.5
    with pytest.raises(ConfigValueError, match=r"--lr must be at least 0, got -1 \(int\)"):
        check_number("lr", -1, interval(0))
    with pytest.raises(ConfigValueError, match=r"\(0, 1\)"):
        check_number("beta2_end", 1.0, interval(0, 1, True, True))
    with pytest.raises(ConfigValueError, match=r"got True \(bool\)"):
        check_number("epochs", True, interval(1), integer=True)
    assert check_number("clip_grad", None, interval(0), optional=True) is None


def _yaml(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_1e_3_and_quoted_numbers_are_parsed(tmp_path):
    """YAML 1.1 reads `lr: 1e-3` as the string '1e-3'; on main it gave "TypeError: '<' not
    supported between 'str' and 'int'". Quoted integers are parsed the same way."""
    cfg, _ = config_from_args(["--config", _yaml(tmp_path, "method: ce\nlr: 1e-3\n"
                                                           "epochs: \"3\"\nweight_decay: 5e-2\n")])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert math.isclose(cfg.weight_decay, 0.05)


@pytest.mark.parametrize("text, field", [("batch_size: [64]", "--batch-size"),
                                         ("epochs: 2.5", "--epochs"),
                                         ("lr: fast", "--lr"),
                                         ("betas: 0.9", "--betas"),
                                         ("plot: 3", "--plot")])
def test_wrong_typed_yaml_values_are_named(tmp_path, text, field):
    """`batch_size: [64]` and the like: on main a TypeError named no field."""
    with pytest.raises(ValueError) as e:
        config_from_args(["--config", _yaml(tmp_path, "method: ce\n" + text + "\n")])
    assert str(e.value).startswith(field), str(e.value)


def test_python_yaml_tag_is_refused_without_a_traceback(tmp_path):
    """A `!!python/object` tag failed safely on main but as yaml's ConstructorError, which the
    CLI did not catch (a raw traceback). Now a one-line ValueError naming the file."""
    path = _yaml(tmp_path, "method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError, match="recipe.yaml: not a plain YAML mapping"):
        config_from_args(["--config", path])


def test_keyword_values_go_through_the_same_checks():
    """make_config (the Python API, the demo) coerces and validates like the CLI."""
    assert make_config(method="ce", lr="2e-3").lr == 2e-3
    with pytest.raises(ValueError, match="--temperature"):
        make_config(method="ce", temperature=float("inf"))


def test_device_cuda_without_cuda_is_one_line(tmp_path):
    """`--device cuda` on a machine without CUDA (hidden here with CUDA_VISIBLE_DEVICES) failed
    safely on main but with a traceback. Now one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "gendd_fast.train", "--method", "ce", "--dataset",
                        "synthetic", "--device", "cuda", "--output", str(tmp_path / "run")],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
                                CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: --device cuda: no CUDA device")
    assert "Traceback" not in r.stderr
