"""Checks for user-facing arguments: one small function per kind of value.

SamplingParams, EngineConfig and the command line check their arguments with these, so that
every mistake gets the same kind of message, starting with the field's name:

* a value of the wrong type is a ``TypeError`` saying which type is wanted:
  ``check_int("max_tokens", 2.5, ge=1)`` -> "max_tokens must be an int, got float 2.5";
* a value of the right type outside its range is a ``ValueError`` saying the range:
  ``check_int("block_size", 0, ge=1)`` -> "block_size must be at least 1, got 0".

``bool`` is a subclass of ``int`` in Python, but ``max_tokens=True`` is a mistake, so the
number checks refuse it. Each check returns the value (normalised where it says so), so a
new field is one line: ``self.top_k = check_int("top_k", self.top_k, ge=0)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, ge: int | None = None, optional: bool = False) -> int | None:
    """An int (not a bool), at least ``ge``; None too when ``optional``."""
    if value is None and optional:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {_got(value)}")
    if ge is not None and value < ge:
        raise ValueError(f"{name} must be at least {ge}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> float | None:
    """A real number (an int is accepted, a bool or NaN is not) within the given bounds."""
    if value is None and optional:
        return None
    if not (_is_int(value) or isinstance(value, float)):
        raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got {_got(value)}")
    low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    if math.isnan(value) or not low_ok or (le is not None and value > le):
        raise ValueError(f"{name} must be {_range(ge, gt, le)}, got {value}")
    return value


def _range(ge: float | None, gt: float | None, le: float | None) -> str:
    """'in (0, 1]', 'at least 0', 'greater than 0', 'at most 1': the words for the bounds."""
    if (ge is not None or gt is not None) and le is not None:
        return f"in {'[' if ge is not None else '('}{ge if ge is not None else gt}, {le}]"
    if ge is not None:
        return f"at least {ge}"
    if gt is not None:
        return f"greater than {gt}"
    return f"at most {le}" if le is not None else "a number"


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")
    return value


def check_str_list(name: str, value: Any) -> list[str]:
    """None, a string or a list of strings -> a list of strings (vLLM's ``stop``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    items = _as_list(name, value, "a string or a list of strings")
    if not all(isinstance(s, str) for s in items):
        raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")
    return items


def check_int_list(name: str, value: Any, *, ge: int | None = None) -> list[int]:
    """None or a list of ints (each at least ``ge``) -> a list of ints."""
    if value is None:
        return []
    items = _as_list(name, value, "a list of ints")
    if not all(_is_int(t) for t in items):
        raise TypeError(f"{name} must be a list of ints, got {value!r}")
    if ge is not None and any(t < ge for t in items):
        raise ValueError(f"{name} must hold ints of at least {ge}, got {value!r}")
    return items


def _as_list(name: str, value: Any, wanted: str) -> list:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {wanted}, got {_got(value)}")
    return list(value)
