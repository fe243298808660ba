# ruff: noqa: F811 - pytest fixtures imported from daemon_helpers
"""Issue 13: the control-frame validator is strict: version the integer 1, integers within int64,
shallow JSON, job ids ASCII digits; hostile frames are bad_request/bad_version, never internal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq
from daemon_helpers import config, daemons, home  # noqa: F401

from dallm.protocol import ProtocolError, decode_request


@pytest.mark.parametrize("v", ["1.0", "true", '"1"', "2"])
def test_version_must_be_the_integer_1(v: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_request(f'{{"v":{v},"id":1,"req":{{"op":"ping"}}}}'.encode())
    assert err.value.code == "bad_version"
    assert decode_request(b'{"v":1,"id":1,"req":{"op":"ping"}}')[1].op == "ping"


@pytest.mark.parametrize(
    "frame",
    [
        b'{"v":1,"id":99999999999999999999,"req":{"op":"ping"}}',
        b'{"v":1,"id":1,"req":{"op":"priority","job":"1","priority":-99999999999999999999}}',
        b'{"v":1,"id":1,"req":{"op":"history","since":9223372036854775808}}',
        b'{"v":1,"id":1,"req":{"op":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"v":1,"id":1,"req":{"op":"ping","x":' + b"[" * 40 + b"]" * 40 + b"}}",
        '{"v":1,"id":1,"req":{"op":"show","job":"\u0661"}}'.encode(),
        '{"v":1,"id":1,"req":{"op":"stop","job":"\uff11"}}'.encode(),
    ],
    ids=["id>2^63", "priority<-2^63", "since=2^63", "100k-deep", "40-deep", "arabic-indic-1", "fullwidth-1"],
)
def test_hostile_frames_are_bad_requests(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_request(frame)
    assert err.value.code == "bad_request"


def test_int64_edges_pass() -> None:
    _, req = decode_request(
        b'{"v":1,"id":9223372036854775807,"req":{"op":"priority","job":"7","priority":-9223372036854775808}}'
    )
    assert req.priority == -(1 << 63)


def test_daemon_answers_bad_request_not_internal(daemons, home: Path) -> None:
    d = daemons()
    with d.client() as c:
        job = c.submit(config("one", steps=1000))
        assert job.id == 1
    from dallm.client.home import DaemonPaths

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(DaemonPaths(home).endpoint("control"))
    try:
        for frame in [
            b'{"v":1,"id":1,"req":{"op":"priority","job":"1","priority":99999999999999999999}}',
            b'{"v":1,"id":2,"req":{"op":"history","since":' + b"9" * 25 + b"}}",
            b'{"v":1,"id":3,"req":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            '{"v":1,"id":4,"req":{"op":"show","job":"\u0661"}}'.encode(),
            b'{"v":1.0,"id":5,"req":{"op":"shutdown"}}',
            b'{"v":true,"id":6,"req":{"op":"shutdown"}}',
        ]:
            s.send(frame)
            assert s.poll(5000, zmq.POLLIN)
            rep = json.loads(s.recv_multipart()[0])["rep"]
            assert rep["op"] == "error" and rep["code"] in ("bad_request", "bad_version"), rep
        with d.client() as c:
            assert c.summary(1).priority == 0 and c.ping()  # nothing changed, still serving
    finally:
        s.close(0)


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_a_request_carries_finite_numbers_only(value: str) -> None:
    """Issue 25: `lr = Infinity` in a raw JSON request (the CLI refuses it; Python's JSON does not)."""
    cfg = json.dumps(config("inf", steps=5)).replace('"steps": 5', f'"steps": 5, "lr": {value}')
    with pytest.raises(ProtocolError) as err:
        decode_request(f'{{"v":1,"id":1,"req":{{"op":"submit","config":{cfg}}}}}'.encode())
    assert err.value.code == "bad_request" and "finite" in str(err.value)
