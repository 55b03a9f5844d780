"""The checks every config runs at construction, and the one form of their errors.

A bad value raises ``ValueError("<owner>.<field>=<value> is invalid: <what is allowed>")``: the class
(or function) and field, the value as written, and what would be accepted. A config whose fields are
command-line flags passes ``owner=FLAG`` so the message names the flag (``--batch-size=0 is invalid: ...``);
``owner=""`` names the bare field (a function's keyword argument).

Imports nothing of moekit, so any module may use it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

FLAG = "--"  # owner of a config whose fields are command-line flags: the field is written --field-name


def bad(owner: str, field: str, value: Any, allowed: str) -> ValueError:
    """The error for ``value`` in ``owner.field``; ``allowed`` says what would be accepted."""
    if owner == FLAG:
        name = "--" + field.replace("_", "-")
    else:
        name = f"{owner}.{field}" if owner else field
    return ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_int(owner: str, field: str, value: Any, minimum: int) -> None:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(owner, field, value, f"expected an int >= {minimum}")


def check_float(owner: str, field: str, value: Any, minimum: float = 0, maximum: float | None = None, *,
                above: bool = False, below: bool = False, note: str = "") -> None:
    """A finite number (an int counts; a bool does not) in [minimum, maximum]: ``above`` / ``below``
    exclude the bound. ``note`` is added to the message in brackets (``0 = off``)."""
    low = f"{'>' if above else '>='} {minimum:g}"
    high = "" if maximum is None else f" and {'<' if below else '<='} {maximum:g}"
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > minimum if above else value >= minimum)
          and (maximum is None or (value < maximum if below else value <= maximum)))
    if not ok:
        raise bad(owner, field, value, f"expected a finite number {low}{high}" + (f" ({note})" if note else ""))


def check_choice(owner: str, field: str, value: Any, allowed: Iterable) -> None:
    """One of ``allowed`` (listed in the message in their order)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise bad(owner, field, value, f"allowed values are {', '.join(repr(a) for a in allowed)}")
