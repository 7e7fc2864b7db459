"""Streams: positions, bounded history and recovery decisions, with an injected clock."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcastd.core.envelope import Payload
from broadcastd.core.idempotency import Idempotency
from broadcastd.core.stream import (
    ENTRY_OVERHEAD,
    Position,
    Streams,
    plan_recovery,
)
from broadcastd.errors import ChannelTableFull


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(size: int = 100, ttl: float = 300.0, max_bytes: int = 1 << 30, max_streams: int = 1000):
    clock = Clock()
    epochs = (f"e{i}" for i in itertools.count())
    streams = Streams(
        size=size,
        ttl=ttl,
        max_bytes=max_bytes,
        max_streams=max_streams,
        new_epoch=lambda: next(epochs),
        clock=clock,
    )
    return streams, clock


def text(value: str) -> Payload:
    return Payload.from_value(value)


def test_offsets_count_from_one_in_one_epoch() -> None:
    streams, _ = make()
    first = streams.append("a", text("x"))
    second = streams.append("a", text("y"))
    assert (first.epoch, first.offset, second.offset) == ("e0", 1, 2)
    assert streams.append("b", text("z")).epoch == "e1"
    assert streams.get("a").position == Position("e0", 2)  # type: ignore[union-attr]


def test_a_subscribed_channel_begins_its_epoch_before_any_publish() -> None:
    streams, _ = make()
    assert streams.pin("a").position == Position("e0", 0)
    assert streams.append("a", text("x")).epoch == "e0"


def test_the_frame_is_encoded_once_and_shared() -> None:
    streams, _ = make()
    publication = streams.append("news", text("x"))
    assert publication.frame() is publication.frame()
    assert publication.frame().endswith(b'{"channel":"news","offset":1,"data":"x"}')


def test_history_keeps_the_last_size_messages() -> None:
    streams, _ = make(size=3)
    for i in range(5):
        streams.append("a", text(str(i)))
    assert [p.offset for p in streams.since("a", 2, 10) or []] == [3, 4, 5]
    assert streams.since("a", 1, 10) is None  # offset 2 is gone
    assert streams.since("a", 5, 10) == []
    assert streams.entries == 3
    assert streams.evicted.size == 2


def test_size_zero_keeps_nothing_but_still_counts() -> None:
    streams, _ = make(size=0)
    streams.append("a", text("x"))
    assert streams.get("a").offset == 1  # type: ignore[union-attr]
    assert streams.entries == 0


def test_ttl_expires_entries_and_then_forgets_idle_channels() -> None:
    streams, clock = make(ttl=10)
    streams.append("idle", text("x"))
    streams.pin("held")
    streams.append("held", text("y"))
    clock.now += 5
    streams.append("idle", text("z"))
    clock.now += 6  # the first two are past their TTL, the third is not
    assert streams.expire() == 2
    assert [p.offset for p in streams.since("idle", 1, 10) or []] == [2]
    clock.now += 10
    assert streams.expire() == 1
    assert "idle" not in streams  # its whole history expired: its count restarts
    assert streams.get("held").position == Position("e1", 1)  # type: ignore[union-attr]
    assert streams.append("idle", text("again")).epoch == "e2"
    assert streams.evicted.ttl == 3


def test_reads_skip_entries_expired_since_the_last_sweep() -> None:
    streams, clock = make(ttl=10)
    streams.append("a", text("x"))
    clock.now += 11
    assert streams.since("a", 0, 10) is None
    assert streams.latest("a", 5) == []


def test_the_byte_budget_evicts_the_oldest_entries_across_channels() -> None:
    one = text("x" * 100)
    cost = 2 * len(one.json) + len(one.raw) + ENTRY_OVERHEAD
    streams, _ = make(max_bytes=3 * cost)
    streams.append("a", one)
    streams.append("b", one)
    streams.append("a", one)
    streams.append("c", one)
    assert streams.bytes == 3 * cost
    assert streams.since("a", 0, 10) is None  # a:1 was the oldest
    assert [p.offset for p in streams.since("a", 1, 10) or []] == [2]
    assert streams.evicted.budget == 1


def test_the_fifo_stays_bounded_when_the_size_cap_does_the_evicting() -> None:
    streams, _ = make(size=2)
    for i in range(10_000):
        streams.append("a", text(str(i)))
    assert len(streams._fifo) <= 2 * streams.entries + 1024


def test_a_full_table_forgets_the_least_recently_used_idle_channel() -> None:
    streams, _ = make(max_streams=2)
    streams.append("a", text("1"))
    streams.append("b", text("1"))
    streams.append("a", text("2"))  # b is now the least recently used
    streams.append("c", text("1"))
    assert "b" not in streams
    assert streams.evicted.channels == 1
    streams.pin("a")
    streams.pin("c")
    assert not streams.has_room_for(["d"])
    assert streams.has_room_for(["a", "c"])
    with pytest.raises(ChannelTableFull):
        streams.append("d", text("1"))


def test_latest_gives_the_last_n() -> None:
    streams, _ = make()
    for i in range(5):
        streams.append("a", text(str(i)))
    assert [p.offset for p in streams.latest("a", 2)] == [4, 5]
    assert [p.offset for p in streams.latest("a", 50)] == [1, 2, 3, 4, 5]


def recovery_of(streams: Streams, name: str, since: Position, max_recover: int = 1000):
    stream = streams.get(name)
    assert stream is not None
    return plan_recovery(
        stream.position, since, max_recover, lambda after, n: streams.since(name, after, n)
    )


def test_recovery_outcomes() -> None:
    streams, _ = make(size=5)
    for i in range(10):
        streams.append("a", text(str(i)))
    ok = recovery_of(streams, "a", Position("e0", 7))
    assert (ok.recovered, [p.offset for p in ok.replay]) == (True, [8, 9, 10])
    assert recovery_of(streams, "a", Position("e0", 10)) == (True, None, [])
    assert recovery_of(streams, "a", Position("other", 7)).reason == "epoch"
    assert recovery_of(streams, "a", Position("e0", 11)).reason == "position"
    assert recovery_of(streams, "a", Position("e0", 2)).reason == "too_old"
    assert recovery_of(streams, "a", Position("e0", 7), max_recover=2).reason == "too_many"
    top = streams.get("a").position  # type: ignore[union-attr]
    assert plan_recovery(top, Position("e0", 7), 1000, None).reason == "disabled"


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 40)),
        max_size=200,
    ),
    st.integers(1, 8),
)
def test_any_read_within_history_is_exactly_the_missing_offsets(
    ops: list[tuple[str, int]], size: int
) -> None:
    """Publish to random channels; every recovery from a position within history
    gives exactly the offsets after it, in order; any other is refused, never short."""
    streams, _ = make(size=size)
    for name, since in ops:
        streams.append(name, text("m"))
        stream = streams.get(name)
        assert stream is not None
        since = min(since, stream.offset)
        result = recovery_of(streams, name, Position(stream.epoch, since))
        if stream.offset - since <= size:
            assert result.recovered
            assert [p.offset for p in result.replay] == list(range(since + 1, stream.offset + 1))
        else:
            assert (result.recovered, result.reason, result.replay) == (False, "too_old", [])


def test_idempotency_keys_answer_the_first_position_until_they_expire() -> None:
    clock = Clock()
    keys = Idempotency(ttl=10, max_keys=2, clock=clock)
    keys.put("a", "k1", Position("e", 1))
    assert keys.get("a", "k1") == Position("e", 1)
    assert keys.get("b", "k1") is None  # keys are per channel
    keys.put("a", "k2", Position("e", 2))
    keys.put("a", "k3", Position("e", 3))  # over the bound: k1 goes
    assert keys.get("a", "k1") is None
    assert len(keys) == 2
    clock.now += 11
    assert keys.get("a", "k3") is None
    keys.put("a", "k4", Position("e", 4))
    assert len(keys) == 1
