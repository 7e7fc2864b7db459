"""Command parsing and the per-client rules, without a loop or a socket."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcastd.core.outbox import Outbox
from broadcastd.core.session import Command, Session, parse_command
from broadcastd.core.stream import Position
from broadcastd.errors import ClientError, CloseReason
from broadcastd.node import Node

from .conftest import make_settings, node_publish
from .test_channels import valid_names

ids = st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=64)


@given(st.sampled_from(["subscribe", "unsubscribe"]), valid_names, ids)
def test_channel_commands_round_trip(op: str, channel: str, command_id: Any) -> None:
    doc: dict[str, Any] = {"op": op, "channel": channel}
    if command_id is not None:
        doc["id"] = command_id
    assert parse_command(orjson.dumps(doc)) == Command(op, channel, command_id)


@given(st.text())
def test_arbitrary_text_never_raises_anything_but_a_client_error(text: str) -> None:
    with contextlib.suppress(ClientError):
        parse_command(text)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_command"),
        ('{"channel": "x"}', "bad_command"),
        ('{"op": 5}', "bad_command"),
        ('{"op": "dance"}', "unknown_op"),
        ('{"op": "subscribe"}', "bad_command"),
        ('{"op": "subscribe", "channel": "a b"}', "bad_channel"),
        ('{"op": "subscribe", "channel": ""}', "bad_channel"),
        ('{"op": "subscribe", "channel": 3}', "bad_channel"),
        ('{"op": "ping", "id": true}', "bad_command"),
        ('{"op": "ping", "id": {}}', "bad_command"),
        # Nested past orjson's 1024 levels: malformed, like any other bad JSON.
        ("[" * 100_000 + "]" * 100_000, "bad_json"),
        ('{"op": "subscribe", "channel": "a", "id": ' + "[" * 2000 + "]" * 2000 + "}", "bad_json"),
        # Offsets and counts as in the URL: at most a signed 64-bit integer.
        (
            json.dumps(
                {"op": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": 2**63}}
            ),
            "bad_command",
        ),
        (
            json.dumps({"op": "subscribe", "channel": "a", "since": {"last": 2**64 - 1}}),
            "bad_command",
        ),
    ],
)
def test_bad_commands_have_stable_codes(text: str, code: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse_command(text)
    assert caught.value.code == code


def test_the_largest_offset_is_a_valid_since() -> None:
    since = {"epoch": "e", "offset": 2**63 - 1}
    text = json.dumps({"op": "subscribe", "channel": "a", "since": since})
    assert parse_command(text).since == Position("e", 2**63 - 1)


def replies(outbox: Outbox) -> list[dict[str, Any]]:
    return [json.loads(frame[2:]) for frame in outbox.take()]


def make_session(**kwargs: Any) -> tuple[Session, Node]:
    node = Node(make_settings())
    node.broker.attach(node)  # type: ignore[attr-defined]  # the memory engine, started
    return Session("c1", node, Outbox(100, 100_000), **kwargs), node


def test_subscribe_reply_carries_the_position_and_echoes_the_id() -> None:
    session, node = make_session()
    epoch = node_publish(node, "news", 1).position.epoch
    assert session.handle('{"op": "subscribe", "channel": "news", "id": "a"}') is None
    assert replies(session.outbox) == [
        {
            "type": "subscribed",
            "channel": "news",
            "epoch": epoch,
            "offset": 1,
            "id": "a",
            "client": "c1",  # the first reply only
            "user": None,
        }
    ]


def test_subscribe_with_since_replays_after_the_reply() -> None:
    session, node = make_session()
    epoch = ""
    for i in range(4):
        epoch = node_publish(node, "news", i).position.epoch
    since = json.dumps({"epoch": epoch, "offset": 1})
    session.handle(f'{{"op": "subscribe", "channel": "news", "since": {since}, "id": 7}}')
    got = replies(session.outbox)
    assert got[0] == {
        "type": "subscribed",
        "channel": "news",
        "epoch": epoch,
        "offset": 4,
        "recovered": True,
        "id": 7,
        "client": "c1",
        "user": None,
    }
    assert [m["offset"] for m in got[1:]] == [2, 3, 4]
    session.handle('{"op": "subscribe", "channel": "news", "since": {"epoch": "x", "offset": 1}}')
    assert replies(session.outbox)[0]["reason"] == "epoch"


def test_raw_clients_are_told_the_outcome_of_a_recovery_they_asked_for() -> None:
    session, node = make_session(raw=True)
    epoch = node_publish(node, "a", "m").position.epoch
    session.open(["a"], [("a", Position(epoch, 0))])
    frames = session.outbox.take()
    assert json.loads(frames[0][2:])["recovered"] is True
    assert frames[1][2:] == b"m"


def test_unsubscribe_and_ping() -> None:
    session, _ = make_session()
    session.handle('{"op": "subscribe", "channel": "x"}')
    session.handle('{"op": "unsubscribe", "channel": "x", "id": 3}')
    session.handle('{"op": "unsubscribe", "channel": "x"}')
    session.handle('{"op": "ping", "id": 9}')
    got = replies(session.outbox)
    assert got[1] == {"type": "unsubscribed", "channel": "x", "id": 3}
    assert got[2]["code"] == "not_subscribed"
    assert got[3] == {"type": "pong", "id": 9}


def test_channel_limit_per_client() -> None:
    session, _ = make_session(max_channels=2)
    session.open(["a", "b"])
    session.handle('{"op": "subscribe", "channel": "a"}')  # already held: allowed
    session.handle('{"op": "subscribe", "channel": "c", "id": 1}')
    got = replies(session.outbox)
    assert [r["type"] for r in got] == ["subscribed"] * 3 + ["error"]
    assert got[-1] == {
        "type": "error",
        "code": "too_many_channels",
        "message": "at most 2 channels per connection",
        "op": "subscribe",
        "id": 1,
    }


def test_raw_clients_are_not_told_about_url_channels() -> None:
    session, _ = make_session(raw=True)
    session.open(["a"])
    assert replies(session.outbox) == []


def test_repeated_errors_end_in_a_policy_close() -> None:
    session, _ = make_session(max_errors=3)
    assert session.handle("x") is None
    assert session.handle("x") is None
    assert session.handle("x") is CloseReason.POLICY
    assert len(replies(session.outbox)) == 3


def test_close_leaves_every_channel() -> None:
    session, node = make_session()
    session.open(["a", "b"])
    session.close()
    assert node.hub.subscriptions == 0
    session.close()
