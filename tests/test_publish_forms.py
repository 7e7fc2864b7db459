"""The JSON publish forms: data embedded as written, errors as documented."""

from __future__ import annotations

import pytest

from broadcastd.core.envelope import Payload
from broadcastd.core.publish_forms import body_payload, parse_batch, parse_publish
from broadcastd.errors import ClientError

DEEP = b"[" * 100_000 + b"]" * 100_000
"""JSON nested far beyond the parser's recursion limit."""


def code_of(body: bytes) -> str:
    with pytest.raises(ClientError) as raised:
        parse_publish(body, 10)
    return raised.value.code


@pytest.mark.parametrize(
    "data",
    [
        b"123456789012345678901234567890",
        b"-1.10e+40",
        b'{"a":  [1, 2.50, {"b": null}]}',
        b"[ ]",
        b"true",
        b'"line\\nbreak \\u00e9 \\ud83d\\ude00"',
    ],
)
def test_data_is_embedded_as_the_client_wrote_it(data: bytes) -> None:
    channels, payload, multi = parse_publish(b'{"channel": "a", "data": ' + data + b" }", 10)
    assert (channels, payload.json, multi) == (["a"], data, False)
    assert len(payload) == len(data)  # the payload size is the embedded text's


def test_raw_subscribers_get_the_text_of_a_string_and_the_json_of_anything_else() -> None:
    _, text, _ = parse_publish(b'{"channel": "a", "data": "caf\\u00e9 \\"q\\""}', 10)
    assert (text.json, text.raw) == (b'"caf\\u00e9 \\"q\\""', 'café "q"'.encode())
    _, other, _ = parse_publish(b'{"channel": "a", "data": {"k": 1}}', 10)
    assert other.raw == other.json == b'{"k": 1}'


def test_the_multi_channel_form_names_each_channel_once() -> None:
    channels, payload, multi = parse_publish(b'{"channels": ["a", "b", "a"], "data": 7}', 10)
    assert (channels, payload.json, multi) == (["a", "b"], b"7", True)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"channel": "a", "data": [1,}', "bad_json"),
        (b'{"channel": "a", "data": nul}', "bad_json"),
        (b'{"channel": "a", "data": "\xff"}', "bad_json"),
        (b'{"channel": "a", "data": 1} x', "bad_json"),
        (b"[1]", "bad_command"),
        (b'{"channel": "a"}', "bad_command"),
        (b'{"channel": "a", "channels": ["b"], "data": 1}', "bad_command"),
        (b'{"data": 1}', "bad_command"),
        (b'{"channels": [], "data": 1}', "bad_command"),
        (b'{"channels": "a", "data": 1}', "bad_command"),
        (b'{"channels": ["a", "a b"], "data": 1}', "bad_channel"),
        (b'{"channel": 5, "data": 1}', "bad_channel"),
        (b'{"channel": null, "data": 1}', "bad_channel"),
        (
            b'{"channels": ["c0","c1","c2","c3","c4","c5","c6","c7","c8","c9","cA"], "data": 1}',
            "too_many_items",
        ),
        (b'{"channel": "a", "data": ' + DEEP + b"}", "bad_json"),
        (b'{"channel": "a", "data": 1, "x": ' + DEEP + b"}", "bad_json"),
    ],
)
def test_a_bad_publish_body_gets_its_code(body: bytes, code: str) -> None:
    assert code_of(body) == code


def summary(items: list[tuple[str, Payload] | ClientError]) -> list[tuple[str, bytes] | str]:
    return [
        item.code if isinstance(item, ClientError) else (item[0], item[1].json) for item in items
    ]


def test_a_batch_keeps_each_data_verbatim() -> None:
    body = b'[{"channel": "a", "data": 18446744073709551616}, {"data": {"x": 1.0}, "channel": "b"}]'
    assert summary(parse_batch(body, 10)) == [("a", b"18446744073709551616"), ("b", b'{"x": 1.0}')]


def test_each_bad_batch_item_gets_its_own_error_in_its_place() -> None:
    body = (
        b'[{"channel": "a", "data": 1}, 5, {"channel": "a b", "data": 2}, {"channel": "a"},'
        b' {"channel": ["x"], "data": 3}, "text", {"channel": "b", "data": "ok"}]'
    )
    assert summary(parse_batch(body, 10)) == [
        ("a", b"1"),
        "bad_command",
        "bad_channel",
        "bad_command",
        "bad_channel",
        "bad_command",
        ("b", b'"ok"'),
    ]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"channel": "a", "data": 1}', "bad_command"),
        (b'[{"channel": "a", "data": [}]', "bad_json"),
        (b'[{"channel": "a", "data": "\xc3"}]', "bad_json"),
        (b"[" + b",".join([b'{"channel": "a", "data": 1}'] * 11) + b"]", "too_many_items"),
        (b'[{"channel": "a", "data": ' + DEEP + b"}]", "bad_json"),
        (DEEP, "bad_json"),
        (b"[1, " + DEEP + b"]", "bad_json"),
        # A syntax error after an item that is not an object is found by the
        # item-by-item pass: still the whole body's bad_json.
        (b"[1, [}", "bad_json"),
        (b'[5, {"channel": "a", "data": 1}', "bad_json"),
    ],
)
def test_a_bad_batch_body_is_refused_whole(body: bytes, code: str) -> None:
    with pytest.raises(ClientError) as raised:
        parse_batch(body, 10)
    assert raised.value.code == code


def test_known_channels_are_not_checked_again() -> None:
    # A name the hub holds was checked when it was created.
    items = parse_batch(b'[{"channel": "held", "data": 1}]', 10, known={"held"})
    assert summary(items) == [("held", b"1")]


@pytest.mark.parametrize("body", [DEEP, b'{"a": ' + DEEP + b"}"])
def test_a_json_body_nested_too_deeply_is_bad_json(body: bytes) -> None:
    with pytest.raises(ClientError) as raised:
        body_payload(body, "application/json")
    assert raised.value.code == "bad_json"
    assert "nested too deeply" in raised.value.message
