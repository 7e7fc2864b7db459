"""The forms a message is written in, made once at fan-out: each against what an
event stream made of the JSON frame before (the differential check), and as an
``EventSource`` or a line reader parses it; and fan-out queueing one object per
form for every subscriber that reads it."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcastd.core.envelope import Payload, Reply, frame_payload, reply_frame
from broadcastd.core.eventstream import SSE, EventStream, Message, Messages
from broadcastd.core.forms import Form, Prepared, base36, encode
from broadcastd.core.outbox import Outbox
from broadcastd.core.stream import Publication
from broadcastd.node import Node

from .conftest import make_settings, node_publish

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@st.composite
def payloads(draw: Any) -> Payload:
    """What publishers send: values, JSON text as written (newlines and carriage
    returns as whitespace), and plain text with any line ends."""
    kind = draw(st.sampled_from(["value", "text", "json"]))
    if kind == "value":
        return Payload.from_value(draw(_json_values))
    if kind == "text":
        return Payload.from_text_body(draw(st.text()).encode())
    value = draw(_json_values)
    indent = draw(st.sampled_from([b"\n", b"\r\n", b"\r", b" \n "]))
    text = json.dumps(value, indent=1).encode().replace(b"\n", indent)
    return Payload.from_json_body(text)


def parse_events(stream: bytes) -> list[dict[str, Any]]:
    """Events as ``EventSource`` parses them (the WHATWG algorithm, without
    ``retry``): lines end in LF, CR or CRLF; ``data`` lines join with LF."""
    text = stream.decode()
    events: list[dict[str, Any]] = []
    data: list[str] = []
    event: dict[str, Any] = {}
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data:
                events.append({**event, "data": "\n".join(data)})
            data, event = [], {}
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event"):
            event[name] = value
    return events


names = st.from_regex(r"[a-z0-9:_.-]{1,20}", fullmatch=True)
epochs = st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True)
offsets = st.integers(min_value=1, max_value=2**53 - 1)


@settings(max_examples=300, deadline=None)
@given(names, epochs, offsets, payloads())
def test_each_form_is_what_a_stream_made_of_the_json_frame(
    channel: str, epoch: str, offset: int, payload: Payload
) -> None:
    publication = Publication(
        b'{"channel":"' + channel.encode() + b'","offset":', epoch, offset, payload, 0.0
    )
    frame = publication.encoded(Form.FRAME)
    envelope = orjson.loads(bytes(frame_payload(frame)))
    message = Message(frame)
    position = f"1~{epoch}.{base36(offset)}"

    event = publication.encoded(Form.EVENT)
    assert type(event) is Prepared
    assert event == f"id: {position}\n".encode() + message.json_event
    (parsed,) = parse_events(event)
    assert parsed["id"] == position
    assert "event" not in parsed
    assert json.loads(parsed["data"]) == envelope

    raw_event = publication.encoded(Form.RAW_EVENT)
    if b"\n" in payload.raw or b"\r" in payload.raw:
        # A data: line per line of it: queued as published, the stream makes the event.
        assert raw_event == frame
        stream = EventStream(SSE, (channel,), raw=True)
        told = {"type": "subscribed", "channel": channel, "epoch": epoch, "offset": offset - 1}
        chunk = stream.render([reply_frame(told), frame], Messages())
        raw_event = chunk.partition(b"\r\n")[2][:-2].partition(b"\n\n")[2]
    assert raw_event == f"id: {position}\n".encode() + message.raw_event()
    (parsed,) = parse_events(raw_event)
    assert parsed["id"] == position
    expected_raw = payload.raw.decode().replace("\r\n", "\n").replace("\r", "\n")
    assert parsed["data"] == expected_raw

    line = publication.encoded(Form.LINE)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert b"\r" not in line
    assert orjson.loads(bytes(line)) == envelope
    raw_line = publication.encoded(Form.RAW_LINE)
    assert raw_line.count(b"\n") == 1
    assert b"\r" not in raw_line
    assert orjson.loads(bytes(raw_line)) == envelope["data"]

    assert publication.encoded(Form.RAW_FRAME) == encode(
        Form.RAW_FRAME, publication.prefix, epoch, offset, payload
    )


def test_a_one_channel_stream_writes_prepared_events_as_they_stand_between_its_notices() -> None:
    stream = EventStream(SSE, ("news",), raw=False)
    assert stream.forms() == (Form.FRAME, {"news": Form.EVENT})
    first = Publication(b'{"channel":"news","offset":', "e1", 41, Payload.from_value(1), 0.0)
    second = Publication(b'{"channel":"news","offset":', "e1", 42, Payload.from_value(2), 0.0)
    events = [first.encoded(Form.EVENT), second.encoded(Form.EVENT)]

    alone = stream.render(list(events), Messages())
    assert alone == b"%x\r\n%b%b\r\n" % (len(events[0]) + len(events[1]), *events)

    notice: Reply = reply_frame({"type": "missed", "channel": "news", "count": 3})
    mixed = stream.render([events[0], notice, events[1]], Messages())
    size, _, body = mixed.partition(b"\r\n")
    assert int(size, 16) == len(body) - 2
    assert body.endswith(b"\r\n")
    parsed = parse_events(body[:-2])
    assert [(e.get("id"), e.get("event")) for e in parsed] == [
        ("1~e1.15", None),
        (None, "missed"),
        ("1~e1.16", None),
    ]


async def test_fan_out_makes_each_form_once_for_all_its_readers() -> None:
    node = Node(make_settings())
    await node.start()
    try:
        readers = {form: [Outbox(10, 10_000) for _ in range(3)] for form in Form}
        for form, outboxes in readers.items():
            for outbox in outboxes:
                node.join(outbox, "x", form, None, lambda position, recovery: None, _fail)
        node_publish(node, "x", {"n": 1})
        for form, outboxes in readers.items():
            queued = [outbox.take() for outbox in outboxes]
            assert all(len(frames) == 1 for frames in queued), form
            assert all(frames[0] is queued[0][0] for frames in queued), form
            assert (type(queued[0][0]) is Prepared) == (form not in (Form.FRAME, Form.RAW_FRAME))
    finally:
        await node.close()


def _fail(error: Exception) -> None:
    raise error
