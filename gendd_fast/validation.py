"""One numeric validator for every flag and YAML field, and the type check of config values.

:func:`check_number` takes (name, value, range) and nothing else, so the config can call it from
a table of ranges or from per-field metadata alike. It refuses NaN and Inf everywhere (``x < lo``
is False for NaN, so a plain range check lets NaN through), states the valid range and names the
field, the value and the value's type.

:func:`coerce_value` turns a YAML value into the field's declared type: YAML 1.1 reads ``1e-3``
(no dot) as a *string*, and ``epochs: "3"`` is one too; both are parsed as numbers. A value that
is not a number at all (``batch_size: [64]``) is named instead of failing later with
``TypeError: '<' not supported``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Tuple


class ConfigValueError(ValueError):
    """A config value of the wrong type or outside its range (the CLI prints it in one line)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# (lo, hi, lo_open, hi_open); None for an unbounded side.
Range = Tuple[Optional[float], Optional[float], bool, bool]


def interval(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
             hi_open: bool = False) -> Range:
    return (lo, hi, lo_open, hi_open)


def range_text(rng: Range) -> str:
    lo, hi, lo_open, hi_open = rng
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def condition_text(rng: Range) -> str:
    """The range as words: 'at least 1', 'positive', 'in [0, 1)', 'finite'."""
    lo, hi, lo_open, hi_open = rng
    if lo is None and hi is None:
        return "finite"
    if hi is None:
        return ("positive" if lo == 0 else f"greater than {lo}") if lo_open else f"at least {lo}"
    if lo is None:
        return f"less than {hi}" if hi_open else f"at most {hi}"
    return f"in {range_text(rng)}"


def check_number(name: str, value: Any, rng: Range = interval(), integer: bool = False,
                 optional: bool = False):
    """``value`` if it is a finite number inside ``rng`` (an int when ``integer``), else a
    :class:`ConfigValueError` naming ``name``, the value, its type and the valid range."""
    if value is None and optional:
        return value
    cond = condition_text(rng)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (integer and not isinstance(value, int)):
        want = "an integer" if integer else "a number"
        raise ConfigValueError(f"{_flag(name)} must be {want}, {cond}; got {_describe(value)}")
    if not math.isfinite(value):
        raise ConfigValueError(f"{_flag(name)} must be {cond}, got {_describe(value)}: NaN and "
                               f"Inf are never valid")
    lo, hi, lo_open, hi_open = rng
    if (lo is not None and (value <= lo if lo_open else value < lo)) or \
            (hi is not None and (value >= hi if hi_open else value > hi)):
        raise ConfigValueError(f"{_flag(name)} must be {cond}, got {_describe(value)}")
    return value


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.I)


def _parse_number(name: str, value: Any, integer: bool):
    """A YAML/keyword value for a numeric field: numbers pass, numeric strings are parsed."""
    want = "an integer" if integer else "a number"
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        s = value.strip()
        if integer:
            try:
                return int(s)
            except ValueError:
                f = float(s)
                if f.is_integer():
                    return int(f)
                raise ConfigValueError(f"{_flag(name)} must be {want}, got {_describe(value)}") \
                    from None
        return float(s)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigValueError(f"{_flag(name)} must be {want}, got {_describe(value)}")
    if integer and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigValueError(f"{_flag(name)} must be {want}, got {_describe(value)}")
    return float(value) if not integer else value


def coerce_value(name: str, value: Any, type_text: str):
    """``value`` converted to the declared field type (``type_text`` is the dataclass
    annotation as text: 'int', 'Optional[float]', 'List[int]', 'bool', 'str', ...)."""
    t = type_text.replace("typing.", "")
    optional = t.startswith("Optional[")
    if optional:
        t = t[len("Optional["):-1]
        if value is None:
            return None
    if t.startswith("List["):
        inner = t[len("List["):-1]
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(f"{_flag(name)} must be a list of {inner} values, got "
                                   f"{_describe(value)}")
        return [coerce_value(name, v, inner) for v in value]
    if t == "bool":
        if not isinstance(value, bool):
            raise ConfigValueError(f"{_flag(name)} must be true or false, got {_describe(value)}")
        return value
    if t in ("int", "float"):
        return _parse_number(name, value, t == "int")
    if t == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigValueError(f"{_flag(name)} must be a string, got {_describe(value)}")
        return str(value)  # e.g. sampling_steps: 64 read as an int by YAML
    return value
