"""Typed option checks shared by every config: an option is its type and its range, or it is refused.

``int`` means an int (not a bool, not 2.7), ``float`` means a finite number, a choice is one of its
names. Each check returns the value in its canonical type or raises ``ValueError`` naming the option,
what it must be, and what it got.

Example:
    >>> check_int("interval", 3, lo=1)
    3
    >>> check_int("interval", 2.7, lo=1)
    Traceback (most recent call last):
    ...
    ValueError: interval must be an integer, got 2.7
    >>> check_float("threshold", float("nan"), lo=0)
    Traceback (most recent call last):
    ...
    ValueError: threshold must be a finite number, got nan
"""
from __future__ import annotations

import json
import math
import numbers
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["check_int", "check_float", "check_choice", "check_bool", "parse_options", "config_or_keywords"]


def check_int(name: str, value: Any, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer in ``lo..hi`` (inclusive); bools and floats are refused, even 2.0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in {_range(lo, hi)}, got {value}")
    return value


def check_float(name: str, value: Any, *, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False) -> float:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); bools and NaN/inf are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], "
                         f"got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _range(lo: Optional[int], hi: Optional[int]) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"{lo}..{hi}"


def parse_options(text: str, what: str = "options") -> Dict[str, Any]:
    """``"key=value,key=value"`` -> a dict, each value read as JSON (``3`` is an int, ``0.5`` a float,
    ``true`` a bool, ``[1,2]`` a list); anything else stays a string. Types are then the config's to
    check: ``interval=2.7`` reaches ``StepCacheConfig`` as 2.7 and is refused there.

    Example:
        >>> parse_options("policy=adaptive,threshold=0.2")
        {'policy': 'adaptive', 'threshold': 0.2}
    """
    out: Dict[str, Any] = {}
    for item in _split_top_level(text):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{what}: {item!r} must look like key=value")
        if key in out:
            raise ValueError(f"{what}: {key!r} is given twice")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _split_top_level(text: str) -> List[str]:
    """Split on commas outside brackets, so that list values (``schedule=[[1,0],[1,1]]``) stay whole."""
    items, depth, current = [], 0, []
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i for i in items if i.strip()]


def config_or_keywords(what: str, config_type: type, config: Any, options: Dict[str, Any]) -> Any:
    """The one way a pass takes its options: a frozen ``config_type`` instance, or its fields as
    keywords, never both; an unknown keyword is a ``ValueError`` naming ``what``."""
    if config is not None and options:
        raise ValueError(f"{what}: give options as config={config_type.__name__}(...) or as keywords, not both "
                         f"(got {sorted(options)})")
    if config is not None:
        if not isinstance(config, config_type):
            raise ValueError(f"{what}: config must be a {config_type.__name__}, got {type(config).__name__}")
        return config
    try:
        return config_type(**options)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{what}: {e}") from None
