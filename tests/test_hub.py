"""Node and hub without sockets: subscriptions, positions, fan-out counts, the
bounded channel table, recovery and idempotent publishing (memory broker)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broadcastd.core.envelope import Payload
from broadcastd.core.forms import Form
from broadcastd.core.hub import Hub, page
from broadcastd.core.outbox import Outbox
from broadcastd.core.stream import Last, Position
from broadcastd.errors import ChannelTableFull
from broadcastd.node import Node
from broadcastd.settings import SlowConsumerPolicy

from .conftest import make_settings, node_join, node_publish


def payloads(outbox: Outbox) -> list[bytes]:
    return [frame[2:] for frame in outbox.take()]  # small frames: 2-byte header


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(make_settings(**{"channels.max_channels": 3}))
    await node.start()
    yield node
    await node.close()


def box() -> Outbox:
    return Outbox(10, 10_000)


def publish(node: Node, channel: str, value: Any, key: str | None = None) -> Any:
    return node_publish(node, channel, value, key)


async def test_fan_out_reaches_each_subscriber_once_with_consecutive_offsets(node: Node) -> None:
    a, b, c = box(), box(), box()
    start = node_join(node, a, "news", False)[0]
    assert start.offset == 0
    node_join(node, b, "news", False)[0]
    node_join(node, b, "news", False)[0]  # twice is harmless
    node_join(node, c, "sport", False)[0]
    first = publish(node, "news", {"n": 1})
    second = publish(node, "news", {"n": 2})
    assert (first.position, first.fan_out.queued) == (Position(start.epoch, 1), 2)
    assert second.position.offset == 2
    assert node.hub.subscriptions == 3
    expected = [
        {"channel": "news", "offset": 1, "data": {"n": 1}},
        {"channel": "news", "offset": 2, "data": {"n": 2}},
    ]
    assert [json.loads(p) for p in payloads(a)] == expected
    assert [json.loads(p) for p in payloads(b)] == expected
    assert payloads(c) == []


async def test_all_subscribers_share_one_encoded_frame(node: Node) -> None:
    outboxes = [box() for _ in range(5)]
    for outbox in outboxes:
        node_join(node, outbox, "x", False)[0]
    publish(node, "x", "hello")
    frames = [outbox.take()[0] for outbox in outboxes]
    assert all(frame is frames[0] for frame in frames)


async def test_raw_subscribers_get_the_payload_alone(node: Node) -> None:
    raw, enveloped = box(), box()
    node_join(node, raw, "x", True)[0]
    node_join(node, enveloped, "x", False)[0]
    assert publish(node, "x", "hello").fan_out.queued == 2
    assert payloads(raw) == [b"hello"]
    assert json.loads(payloads(enveloped)[0])["data"] == "hello"


async def test_unsubscribe_stops_delivery(node: Node) -> None:
    a = box()
    node_join(node, a, "x", False)[0]
    node.unsubscribe(a, "x")
    node.unsubscribe(a, "x")  # harmless
    node.unsubscribe(a, "never")
    assert publish(node, "x", 1).fan_out.queued == 0
    assert node.hub.subscriptions == 0
    assert "x" not in node.hub  # the broker keeps its stream
    assert node.channel_state("x") == (Position(node.channel_state("x")[0].epoch, 1), 0)


async def test_fan_out_counts_drops_and_refusals_without_stopping(node: Node) -> None:
    slow = Outbox(1, 10_000)
    dropping = Outbox(1, 10_000, SlowConsumerPolicy.DROP_OLDEST)
    fine = box()
    for outbox in (slow, dropping, fine):
        node_join(node, outbox, "x", False)[0]
    publish(node, "x", 1)
    second = publish(node, "x", 2).fan_out
    assert (second.queued, second.dropped, second.refused) == (2, 1, 1)
    assert len(payloads(fine)) == 2


async def test_positions_survive_while_the_channel_is_remembered(node: Node) -> None:
    publish(node, "a", 1)
    epoch = publish(node, "a", 2).position.epoch
    assert node_join(node, box(), "a", False)[0] == Position(epoch, 2)


async def test_idle_channels_are_forgotten_oldest_first_and_busy_ones_never(node: Node) -> None:
    node_join(node, box(), "busy", False)[0]
    publish(node, "idle1", 1)
    publish(node, "idle2", 1)
    publish(node, "idle3", 1)  # forgets idle1: its count restarts in a new epoch
    assert node.channel_state("idle1") is None
    assert node.channel_state("busy") is not None
    node_join(node, box(), "idle2", False)[0]
    node_join(node, box(), "idle3", False)[0]
    with pytest.raises(ChannelTableFull):
        publish(node, "fourth", 1)
    with pytest.raises(ChannelTableFull):
        node.publish_all(
            [(c, Payload.from_value(1), None) for c in ("busy", "fourth")], "json", all_or_none=True
        )
    assert node.channel_state("busy")[0].offset == 0  # all or nothing


async def test_recovery_replays_exactly_what_was_missed(node: Node) -> None:
    a = box()
    start = node_join(node, a, "x", False)[0]
    for i in range(5):
        publish(node, "x", i)
    recovery = node_join(node, box(), "x", since=Position(start.epoch, 2))[1]
    assert recovery.recovered
    assert [p.offset for p in recovery.replay] == [3, 4, 5]
    assert node_join(node, box(), "x", since=Position("other", 2))[1].reason == "epoch"
    assert [p.offset for p in node_join(node, box(), "x", since=Last(2))[1].replay] == [4, 5]


async def test_an_idempotency_key_publishes_once(node: Node) -> None:
    a = box()
    node_join(node, a, "x", False)[0]
    first = publish(node, "x", "m", key="k")
    again = publish(node, "x", "m", key="k")
    other = publish(node, "y", "m", key="k")  # keys are per channel
    assert again.duplicate
    assert again.position == first.position
    assert again.fan_out is None
    assert not other.duplicate
    assert len(payloads(a)) == 1


def test_pages_list_names_in_order_after_the_cursor() -> None:
    names = ["m", "b", "z:1", "a@x", "q", "c", "b.2"]
    walked: list[str] = []
    cursor = None
    while True:
        chosen, cursor = page(names, cursor, 3)
        walked += chosen
        if cursor is None:
            break
        assert cursor == chosen[-1]
    assert walked == sorted(names)
    assert page(names, "z:1", 3) == ([], None)
    assert page(names, None, len(names)) == (sorted(names), None)


def test_an_outbox_reads_one_form_per_channel_and_leaves_with_one_leave() -> None:
    hub = Hub()
    channel = hub.add("x", Position("e", 0))
    box = Outbox(10, 10_000)
    hub.join(channel, box, Form.EVENT)
    hub.join(channel, box, Form.FRAME)  # joined already: the first form stays
    assert (channel.subscriber_count, hub.subscriptions) == (1, 1)
    assert list(channel.forms) == [Form.EVENT]
    assert hub.leave(box, "x") is True
    assert "x" not in hub
