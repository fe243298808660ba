"""Shape limits of a decoded control frame, checked before any model sees it: integers must fit
SQLite's int64, nesting is shallow, and a request's numbers are finite (`Infinity`, `NaN`, `1e999`
are JSON to Python but no config value: `lr = Infinity` would pass `gt=0`), so a hostile frame is a
bad_request, never an `internal` error deep in the store (OverflowError) or the parser
(RecursionError), nor a job that trains on nonsense."""

from __future__ import annotations

import json
import math
from typing import Any

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_DEPTH = 32  # a job config nests 3 levels; the envelope adds 2


class FrameShapeError(ValueError):
    """One line: what in the frame is out of bounds."""


def _no_constant(name: str) -> float:
    raise FrameShapeError(f"{name} is not a finite number")


def loads_bounded(frame: bytes, finite: bool = False) -> Any:
    """json.loads, with RecursionError (very deep nesting) reported as FrameShapeError; `finite`:
    NaN and infinities refused too (a request's; replies carry stored metrics, where NaN is data)."""
    try:
        data = json.loads(frame, parse_constant=_no_constant) if finite else json.loads(frame)
    except RecursionError:
        raise FrameShapeError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    check_shape(data, finite)
    return data


def check_shape(data: Any, finite: bool = False) -> None:
    """FrameShapeError for an integer outside int64, nesting deeper than MAX_DEPTH, or (`finite`)
    a float that overflowed to infinity (iterative: the check itself cannot overflow the stack)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, bool):
            continue
        if isinstance(node, int):
            if not INT64_MIN <= node <= INT64_MAX:
                raise FrameShapeError(f"integer {str(node)[:30]}... out of the 64-bit range")
        elif isinstance(node, float):
            if finite and not math.isfinite(node):
                raise FrameShapeError(f"{node} is not a finite number")
        elif isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise FrameShapeError(f"JSON nested deeper than {MAX_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
