"""Shape limits of a decoded control frame, checked before any model sees it: integers must fit
SQLite's int64 and nesting is shallow, so a hostile frame is a bad_request, never an `internal`
error deep in the store (OverflowError) or the parser (RecursionError)."""

from __future__ import annotations

import json
from typing import Any

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_DEPTH = 32  # a job config nests 3 levels; the envelope adds 2


class FrameShapeError(ValueError):
    """One line: what in the frame is out of bounds."""


def loads_bounded(frame: bytes) -> Any:
    """json.loads, with RecursionError (very deep nesting) reported as FrameShapeError."""
    try:
        data = json.loads(frame)
    except RecursionError:
        raise FrameShapeError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    check_shape(data)
    return data


def check_shape(data: Any) -> None:
    """FrameShapeError for an integer outside int64 or nesting deeper than MAX_DEPTH (iterative:
    the check itself cannot overflow the stack)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, bool):
            continue
        if isinstance(node, int):
            if not INT64_MIN <= node <= INT64_MAX:
                raise FrameShapeError(f"integer {str(node)[:30]}... out of the 64-bit range")
        elif isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise FrameShapeError(f"JSON nested deeper than {MAX_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
