"""Encoding: frames are valid RFC 6455 for a strict parser, and built once."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from broadcastd.core.envelope import (
    Payload,
    channel_prefix,
    envelope_frame,
    frame_payload,
    raw_frame,
    text_frame,
)
from broadcastd.errors import BadEncoding, BadJson

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def parse_frame(data: bytes) -> Frame:
    """Parse with websockets' own client-side parser (expects unmasked server frames)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        assert not reader.buffer, "bytes left after the frame"
        return frame
    raise AssertionError("incomplete frame")


@given(st.binary(max_size=70_000))
def test_text_frame_round_trips_through_a_strict_parser(payload: bytes) -> None:
    frame = parse_frame(text_frame(payload))
    assert frame.opcode == Opcode.TEXT
    assert frame.fin
    assert bytes(frame.data) == payload


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frame_length_boundaries(size: int) -> None:
    data = text_frame(b"x" * size)
    assert bytes(parse_frame(data).data) == b"x" * size
    assert bytes(frame_payload(data)) == b"x" * size


@given(json_values)
def test_envelope_carries_channel_offset_and_data(value: object) -> None:
    payload = Payload.from_value(value)
    frame = parse_frame(envelope_frame(channel_prefix("news:eu"), 42, payload))
    assert json.loads(frame.data) == {"channel": "news:eu", "offset": 42, "data": value}


@given(json_values)
def test_raw_frame_carries_the_payload_alone(value: object) -> None:
    payload = Payload.from_value(value)
    data = bytes(parse_frame(raw_frame(payload)).data)
    if isinstance(value, str):
        assert data.decode() == value
    else:
        assert json.loads(data) == value


def test_json_body_is_embedded_verbatim_and_validated() -> None:
    body = b'{"price": 42}'
    payload = Payload.from_json_body(body)
    assert payload.json is body
    for bad in (b"{nope", b"NaN", b"[1,]", b'{"a": 1} x', b"", b'"\xff"'):
        with pytest.raises(BadJson):
            Payload.from_json_body(bad)


def test_a_json_body_keeps_numbers_as_written_as_the_json_forms_do() -> None:
    """1e999 is JSON (RFC 8259 leaves the range to the reader): refusing it here,
    as parsing to a float would, while ``/publish`` and ``/batch`` embed it, made
    the forms disagree."""
    for body in (b'{"x": 1e999}', b"123456789012345678901234567890", b" [1.10] "):
        payload = Payload.from_json_body(body)
        assert (payload.json, payload.raw) == (body, body)
    assert Payload.from_json_body(rb' "caf\u00e9" ').raw == "café".encode()


def test_text_body_becomes_a_json_string() -> None:
    payload = Payload.from_text_body('h\u00e9llo "x"'.encode())
    assert json.loads(payload.json) == 'h\u00e9llo "x"'
    assert payload.raw == 'h\u00e9llo "x"'.encode()
    with pytest.raises(BadEncoding):
        Payload.from_text_body(b"\xff\xfe")


def test_a_json_string_body_is_raw_as_its_text() -> None:
    assert Payload.from_json_body(b'"hi"').raw == b"hi"
