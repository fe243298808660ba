"""The daemon's one dispatch of control requests (daemon/handlers.py `handle`, a `match` as pueue's
message handler has): every request type of dallm.protocol has its case, and no case names a type
the protocol does not have."""

from __future__ import annotations

import ast
import inspect
from typing import get_args

from dallm.daemon import handlers
from dallm.protocol import Request


def request_types() -> set[str]:
    union = get_args(Request)[0]  # Request is Annotated[A | B | ..., discriminator]
    return {t.__name__ for t in get_args(union)}


def cases(source: str) -> list[str]:
    """The class named by each `case C():` of the source's match statements."""
    return [
        ast.unparse(node.pattern.cls)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchClass)
    ]


def test_the_case_finder_reads_a_match() -> None:
    source = (
        "match r:\n    case A():\n        pass\n    case B(x=1):\n        pass\n    case _:\n        pass\n"
    )
    assert cases(source) == ["A", "B"]


def test_every_request_type_has_one_case() -> None:
    found = cases(inspect.getsource(handlers.handle))
    assert len(found) == len(set(found)), "a request type has two cases"
    assert "PingRequest" in request_types() and len(request_types()) >= 14
    assert set(found) == request_types()
