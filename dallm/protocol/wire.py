"""Framing: requests, replies and published events as ZeroMQ frames (see `dallm.protocol.control`).

The daemon's fast paths (`envelope_frames`, `history_frames`) build frames from events' JSON text as
stored, without validating them again: they were validated when they came in.
"""

from __future__ import annotations

import json as _json

from dallm.protocol.control import (
    PROTOCOL_VERSION,
    HistoryReply,
    ProtocolError,
    Reply,
    Request,
    reply_adapter,
    request_adapter,
)
from dallm.protocol.events import Message as _Message
from dallm.protocol.events import SampleEvent
from dallm.protocol.jobs import EventEnvelope


def encode_request(req_id: int, req: _Message) -> bytes:
    body = req.model_dump_json()
    return f'{{"v":{PROTOCOL_VERSION},"id":{int(req_id)},"req":{body}}}'.encode()


def _open_frame(frame: bytes, key: str) -> tuple[int, dict]:
    from dallm.protocol.limits import FrameShapeError, loads_bounded

    try:
        data = loads_bounded(frame, finite=key == "req")
    except FrameShapeError as e:
        raise ProtocolError("bad_request", str(e)) from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_request", "frame is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "frame is not a JSON object")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and true are not 1
        raise ProtocolError(
            "bad_version", f"protocol version {data.get('v')!r}; this side speaks {PROTOCOL_VERSION}"
        )
    req_id = data.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ProtocolError("bad_request", "missing or non-integer id")
    body = data.get(key)
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", f"missing {key!r} object")
    return req_id, body


def decode_request(frame: bytes) -> tuple[int, Request]:
    """(id, request) or ProtocolError. The id is 0 when the frame is too broken to carry one."""
    req_id, body = _open_frame(frame, "req")
    try:
        return req_id, request_adapter.validate_python(body)
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        first = str(e).splitlines()
        raise ProtocolError("bad_request", " ".join(first[:3])[:300]) from None


def _envelope_dict(env: EventEnvelope) -> tuple[dict, bytes | None]:
    blob = env.event.png if isinstance(env.event, SampleEvent) and env.event.png else None
    data = (
        env.model_dump(mode="json", exclude={"event": {"png"}})
        if blob is not None
        else env.model_dump(mode="json")
    )
    return data, blob


def encode_reply(req_id: int, rep: _Message) -> list[bytes]:
    """Reply frames; thumbnails in a history reply ride as extra binary frames (no base64)."""
    blobs: list[bytes] = []
    if isinstance(rep, HistoryReply):
        events = []
        for env in rep.events:
            data, blob = _envelope_dict(env)
            if blob is not None:
                data["blob"] = len(blobs)
                blobs.append(blob)
            events.append(data)
        body = _json.dumps({"op": "history", "events": events, "head": rep.head, "more": rep.more})
    else:
        body = rep.model_dump_json()
    head = f'{{"v":{PROTOCOL_VERSION},"id":{int(req_id)},"rep":{body}}}'.encode()
    return [head, *blobs]


def _attach(data: dict, blobs: list[bytes]) -> dict:
    idx = data.pop("blob", None)
    if idx is not None and 0 <= idx < len(blobs):
        data["event"]["png"] = blobs[idx]
    return data


def decode_reply(frames: list[bytes]) -> tuple[int, Reply]:
    req_id, body = _open_frame(frames[0], "rep")
    if body.get("op") == "history" and isinstance(body.get("events"), list):
        body["events"] = [_attach(e, frames[1:]) for e in body["events"]]
    try:
        return req_id, reply_adapter.validate_python(body)
    except ValueError as e:
        raise ProtocolError("bad_reply", str(e).splitlines()[0]) from None


def encode_envelope(env: EventEnvelope) -> list[bytes]:
    data, blob = _envelope_dict(env)
    if blob is not None:
        data["blob"] = 0
        return [env.topic.encode(), _json.dumps(data).encode(), blob]
    return [env.topic.encode(), _json.dumps(data).encode()]


def envelope_frames(
    seq: int, prev: int, topic: str, job: int, t: float, event_json: str, blob: bytes | None
) -> list[bytes]:
    """The daemon's fast path: an envelope from an event's JSON text as stored (no re-validation)."""
    tail = ',"blob":0}' if blob else "}"
    head = f'{{"seq":{seq},"prev":{prev},"topic":"{topic}","job":{job},"t":{t!r},"event":{event_json}{tail}'
    return [topic.encode(), head.encode(), blob] if blob else [topic.encode(), head.encode()]


def decode_envelope(frames: list[bytes]) -> EventEnvelope:
    if len(frames) < 2:
        raise ProtocolError("bad_event", "an event has at least two frames")
    try:
        data = _json.loads(frames[1])
        return EventEnvelope.model_validate(_attach(data, frames[2:]))
    except (ValueError, TypeError, KeyError) as e:
        raise ProtocolError("bad_event", str(e).splitlines()[0]) from None


def history_frames(
    req_id: int, rows: list[tuple[int, int, int, str, int, float, str, bytes | None]], head: int, more: bool
) -> list[bytes]:
    """The daemon's fast path for a HistoryReply from stored rows (seq, prev, job, topic, superseded,
    t, event JSON, png): no re-validation of events that were validated when they came in."""
    blobs: list[bytes] = []
    items = []
    for seq, prev, job, topic, superseded, t, data, blob in rows:
        tail = "}"
        if blob:
            tail = f',"blob":{len(blobs)}}}'
            blobs.append(blob)
        sup = "true" if superseded else "false"
        items.append(
            f'{{"seq":{seq},"prev":{prev},"topic":"{topic}","job":{job},"t":{t!r},"superseded":{sup},"event":{data}{tail}'
        )
    body = (
        f'{{"op":"history","events":[{",".join(items)}],"head":{head},"more":{"true" if more else "false"}}}'
    )
    return [f'{{"v":{PROTOCOL_VERSION},"id":{int(req_id)},"rep":{body}}}'.encode(), *blobs]
