"""Hub: subscriptions, offsets, fan-out counts and the bounded channel table."""

from __future__ import annotations

import json

import pytest

from broadcastd.core.envelope import Payload
from broadcastd.core.hub import Hub
from broadcastd.core.outbox import Outbox
from broadcastd.errors import ChannelTableFull
from broadcastd.settings import SlowConsumerPolicy


def payloads(outbox: Outbox) -> list[bytes]:
    return [frame[2:] for frame in outbox.take()]  # small frames: 2-byte header


def test_fan_out_reaches_each_subscriber_once_with_consecutive_offsets() -> None:
    hub = Hub(10)
    a, b, c = Outbox(10, 10_000), Outbox(10, 10_000), Outbox(10, 10_000)
    assert hub.subscribe(a, "news") == 0
    hub.subscribe(b, "news")
    hub.subscribe(b, "news")  # twice is harmless
    hub.subscribe(c, "sport")
    first = hub.publish("news", Payload.from_value({"n": 1}))
    second = hub.publish("news", Payload.from_value({"n": 2}))
    assert (first.offset, first.queued, second.offset) == (1, 2, 2)
    assert hub.subscriptions == 3
    expected = [
        {"channel": "news", "offset": 1, "data": {"n": 1}},
        {"channel": "news", "offset": 2, "data": {"n": 2}},
    ]
    assert [json.loads(p) for p in payloads(a)] == expected
    assert [json.loads(p) for p in payloads(b)] == expected
    assert payloads(c) == []


def test_all_subscribers_share_one_encoded_frame() -> None:
    hub = Hub(10)
    outboxes = [Outbox(10, 10_000) for _ in range(5)]
    for outbox in outboxes:
        hub.subscribe(outbox, "x")
    hub.publish("x", Payload.from_value("hello"))
    frames = [outbox.take()[0] for outbox in outboxes]
    assert all(frame is frames[0] for frame in frames)


def test_raw_subscribers_get_the_payload_alone() -> None:
    hub = Hub(10)
    raw, enveloped = Outbox(10, 10_000), Outbox(10, 10_000)
    hub.subscribe(raw, "x", raw=True)
    hub.subscribe(enveloped, "x")
    fan_out = hub.publish("x", Payload.from_value("hello"))
    assert fan_out.queued == 2
    assert payloads(raw) == [b"hello"]
    assert json.loads(payloads(enveloped)[0])["data"] == "hello"


def test_unsubscribe_stops_delivery_and_reports_unknown_pairs() -> None:
    hub = Hub(10)
    a = Outbox(10, 10_000)
    hub.subscribe(a, "x")
    assert hub.unsubscribe(a, "x")
    assert not hub.unsubscribe(a, "x")
    assert not hub.unsubscribe(a, "never")
    assert hub.publish("x", Payload.from_value(1)).queued == 0
    assert hub.subscriptions == 0


def test_fan_out_counts_drops_and_refusals_without_stopping() -> None:
    hub = Hub(10)
    slow = Outbox(1, 10_000)
    dropping = Outbox(1, 10_000, SlowConsumerPolicy.DROP_OLDEST)
    fine = Outbox(10, 10_000)
    for outbox in (slow, dropping, fine):
        hub.subscribe(outbox, "x")
    hub.publish("x", Payload.from_value(1))
    second = hub.publish("x", Payload.from_value(2))
    assert (second.queued, second.dropped, second.refused) == (2, 1, 1)
    assert len(payloads(fine)) == 2


def test_offsets_survive_while_the_channel_is_remembered() -> None:
    hub = Hub(2)
    hub.publish("a", Payload.from_value(1))
    hub.publish("a", Payload.from_value(2))
    assert hub.get("a").offset == 2
    assert hub.subscribe(Outbox(10, 10_000), "a") == 2


def test_idle_channels_are_forgotten_oldest_first_and_busy_ones_never() -> None:
    hub = Hub(2)
    busy = Outbox(10, 10_000)
    hub.subscribe(busy, "busy")
    hub.publish("idle1", Payload.from_value(1))
    hub.publish("idle2", Payload.from_value(1))  # forgets idle1
    assert hub.get("idle1") is None
    assert hub.get("busy").offset == 0
    assert hub.get("idle2") is not None
    hub.subscribe(Outbox(10, 10_000), "idle2")
    with pytest.raises(ChannelTableFull):
        hub.publish("third", Payload.from_value(1))
    assert len(hub) == 2


def test_a_channel_that_loses_its_last_subscriber_becomes_forgettable() -> None:
    hub = Hub(1)
    a = Outbox(10, 10_000)
    hub.subscribe(a, "x")
    hub.unsubscribe(a, "x")
    hub.publish("y", Payload.from_value(1))
    assert hub.get("x") is None
