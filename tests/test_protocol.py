"""The daemon section of the protocol: framing round trips, and refusal of bad frames."""

from __future__ import annotations

import json

import pytest

from dallm.protocol import (
    PROTOCOL_VERSION,
    CancelRequest,
    CheckpointRequest,
    ErrorReply,
    EventEnvelope,
    FinishedEvent,
    HistoryReply,
    HistoryRequest,
    JobReply,
    JobStateEvent,
    JobSummary,
    ListRequest,
    LogEvent,
    MetricsEvent,
    PingRequest,
    PriorityRequest,
    ProtocolError,
    RollbackRequest,
    SampleEvent,
    ShowRequest,
    ShutdownRequest,
    StopRequest,
    SubmitRequest,
    decode_envelope,
    decode_reply,
    decode_request,
    encode_envelope,
    encode_reply,
    encode_request,
    envelope_frames,
    history_frames,
)

PNG = b"\x89PNG\r\n\x1a\n\x00\xff binary"

REQUESTS = [
    PingRequest(),
    SubmitRequest(config={"name": "a", "train": {"steps": 3}}, priority=2, retries=1, source="a.toml"),
    ListRequest(states=["queued", "running"], limit=5),
    ShowRequest(job="3"),
    HistoryRequest(since=10, topics=["queue", "job/3/"], limit=100, kinds=["metrics"]),
    StopRequest(job="3"),
    RollbackRequest(job="3", step=250, resume=True),
    CancelRequest(job="x"),
    CheckpointRequest(job="3"),
    PriorityRequest(job="3", priority=-1),
    ShutdownRequest(),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: r.op)
def test_request_round_trip(req) -> None:
    assert decode_request(encode_request(7, req)) == (7, req)


def _summary(**kw) -> JobSummary:
    return JobSummary(id=3, name="a", state="running", **kw)


def test_reply_round_trip_with_thumbnails_as_binary_frames() -> None:
    events = [
        EventEnvelope(
            seq=1, topic="queue", job=3, t=1.0, event=JobStateEvent(job=_summary(), reason="started")
        ),
        EventEnvelope(
            seq=2, prev=0, topic="job/3/", job=3, t=2.0, event=MetricsEvent(step=1, values={"loss": 0.5})
        ),
        EventEnvelope(
            seq=3, prev=2, topic="job/3/", job=3, t=3.0, event=SampleEvent(step=1, path="s.png", png=PNG)
        ),
        EventEnvelope(
            seq=4, prev=3, topic="job/3/", job=3, t=4.0, superseded=True, event=LogEvent(message="hi")
        ),
    ]
    rep = HistoryReply(events=events, head=4, more=False)
    frames = encode_reply(9, rep)
    assert frames[1] == PNG and b"base64" not in frames[0]
    assert decode_reply(frames) == (9, rep)
    # The daemon's fast path from stored rows reads back the same.
    rows = [
        (e.seq, e.prev, e.job, e.topic, int(e.superseded), e.t, e.event.model_dump_json(exclude={"png"}),
         getattr(e.event, "png", None) or None)
        for e in events
    ]  # fmt: skip
    assert decode_reply(history_frames(9, rows, 4, False)) == (9, rep)
    for r in (JobReply(job=_summary(step=4)), ErrorReply(code="not_found", message="no job 'x'")):
        assert decode_reply(encode_reply(1, r)) == (1, r)


def test_envelope_round_trip_and_fast_path() -> None:
    env = EventEnvelope(
        seq=5, prev=2, topic="job/1/", job=1, t=1.25, event=SampleEvent(step=3, path="p", png=PNG)
    )
    frames = encode_envelope(env)
    assert frames[0] == b"job/1/" and frames[2] == PNG
    assert decode_envelope(frames) == env
    ev = FinishedEvent(reason="completed", final_step=3, result_step=3)
    fast = envelope_frames(6, 5, "job/1/", 1, 2.5, ev.model_dump_json(), None)
    assert decode_envelope(fast) == EventEnvelope(seq=6, prev=5, topic="job/1/", job=1, t=2.5, event=ev)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", "bad_request"),
        (b"\xff\xfe garbage", "bad_request"),
        (b'{"v": 1, "id": 1, "req": {"op": "ping"', "bad_request"),  # truncated
        (b"[1, 2]", "bad_request"),
        (json.dumps({"v": PROTOCOL_VERSION + 1, "id": 1, "req": {"op": "ping"}}).encode(), "bad_version"),
        (json.dumps({"id": 1, "req": {"op": "ping"}}).encode(), "bad_version"),
        (json.dumps({"v": PROTOCOL_VERSION, "req": {"op": "ping"}}).encode(), "bad_request"),
        (json.dumps({"v": PROTOCOL_VERSION, "id": True, "req": {"op": "ping"}}).encode(), "bad_request"),
        (json.dumps({"v": PROTOCOL_VERSION, "id": 1, "req": {"op": "format_disk"}}).encode(), "bad_request"),
        (json.dumps({"v": PROTOCOL_VERSION, "id": 1, "req": {"op": "stop"}}).encode(), "bad_request"),
        (json.dumps({"v": PROTOCOL_VERSION, "id": 1, "req": {"op": "ping", "x": 1}}).encode(), "bad_request"),
        (json.dumps({"v": PROTOCOL_VERSION, "id": 1, "req": "ping"}).encode(), "bad_request"),
    ],
)
def test_bad_frames_are_refused(frame: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_request(frame)
    assert err.value.code == code


def test_bad_event_frames() -> None:
    for frames in ([b"job/1/"], [b"job/1/", b"{"], [b"job/1/", b'{"seq": 1}']):
        with pytest.raises(ProtocolError):
            decode_envelope(frames)


def test_the_job_kind_and_its_validation_measure_reach_the_summary_row() -> None:
    from dallm.protocol import StartedEvent

    row = JobSummary(id=1, name="j", state="running")
    assert row.kind is None and row.validation_measure is None  # until the engine says
    started = StartedEvent(start_step=0, total_steps=9, device="cpu", trainable_params=1,
                           job_kind="llm", validation_measure="ppl_val")  # fmt: skip
    row = row.apply(started)
    assert (row.kind, row.validation_measure) == ("llm", "ppl_val")
    assert JobSummary.model_validate_json(row.model_dump_json()) == row
