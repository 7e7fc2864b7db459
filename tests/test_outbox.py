"""Outbox bounds and policies, without a loop or a socket."""

from __future__ import annotations

import pytest

from broadcastd.core.envelope import Reply
from broadcastd.core.outbox import DROPPED, QUEUED, REFUSED, Outbox
from broadcastd.errors import CloseReason
from broadcastd.settings import SlowConsumerPolicy

from .conftest import Wakes


def test_frames_come_out_in_order_and_wake_only_on_empty_to_non_empty() -> None:
    outbox = Outbox(10, 1000)
    wakes = Wakes(outbox)
    assert [outbox.push(b"a"), outbox.push(b"b"), outbox.push(b"c")] == [QUEUED] * 3
    assert wakes.count == 1
    assert outbox.size == 3
    assert outbox.take() == [b"a", b"b", b"c"]
    assert len(outbox) == 0
    assert outbox.size == 0
    outbox.push(b"d")
    assert wakes.count == 2


def test_disconnect_policy_refuses_and_closes_when_full_by_count() -> None:
    outbox = Outbox(2, 1000)
    wakes = Wakes(outbox)
    outbox.push(b"a")
    outbox.push(b"b")
    assert outbox.push(b"c") == REFUSED
    assert outbox.closed is CloseReason.SLOW_CONSUMER
    assert outbox.take() == []  # a slow consumer's backlog is discarded
    assert outbox.push(b"d") == REFUSED  # and nothing more is taken
    assert wakes.count == 2  # the first push, then the close


def test_disconnect_policy_counts_bytes_too() -> None:
    outbox = Outbox(100, 10)
    assert outbox.push(b"12345678") == QUEUED
    assert outbox.push(b"123") == REFUSED
    assert outbox.closed is CloseReason.SLOW_CONSUMER


def test_drop_oldest_keeps_the_newest_and_counts_what_was_missed() -> None:
    outbox = Outbox(3, 1000, SlowConsumerPolicy.DROP_OLDEST)
    for frame in (b"1", b"2", b"3"):
        assert outbox.push(frame) == QUEUED
    assert outbox.push(b"4") == DROPPED
    assert outbox.push(b"5") == DROPPED
    assert outbox.closed is None
    assert outbox.take() == [b"3", b"4", b"5"]
    assert outbox.take_missed() == 2
    assert outbox.take_missed() == 0


def test_drop_oldest_by_bytes_drops_as_many_as_needed() -> None:
    outbox = Outbox(100, 10, SlowConsumerPolicy.DROP_OLDEST)
    for frame in (b"aaa", b"bbb", b"ccc"):
        outbox.push(frame)
    assert outbox.push(b"dddddd") == DROPPED
    assert outbox.take() == [b"ccc", b"dddddd"]
    assert outbox.take_missed() == 2


def test_drop_oldest_refuses_a_frame_larger_than_the_whole_bound() -> None:
    outbox = Outbox(100, 4, SlowConsumerPolicy.DROP_OLDEST)
    outbox.push(b"ab")
    assert outbox.push(b"too large") == REFUSED
    assert outbox.take_missed() == 1  # only the frame that cannot fit
    assert outbox.take() == [b"ab"]


def test_drop_oldest_never_drops_replies_nor_counts_them() -> None:
    outbox = Outbox(3, 1000, SlowConsumerPolicy.DROP_OLDEST)
    outbox.push(Reply(b"r1"))
    outbox.push(b"m1")
    outbox.push(Reply(b"r2"))
    assert outbox.push(b"m2") == DROPPED
    assert outbox.take() == [b"r1", b"r2", b"m2"]
    assert outbox.take_missed() == 1


def test_replies_nobody_reads_end_a_drop_oldest_client() -> None:
    outbox = Outbox(2, 1000, SlowConsumerPolicy.DROP_OLDEST)
    outbox.push(Reply(b"r1"))
    outbox.push(Reply(b"r2"))
    assert outbox.push(b"m") == REFUSED  # a message that cannot fit is missed
    assert outbox.missed == 1
    assert outbox.closed is None
    assert outbox.push(Reply(b"r3")) == REFUSED
    assert outbox.closed is CloseReason.SLOW_CONSUMER


@pytest.mark.parametrize("policy", list(SlowConsumerPolicy))
def test_a_full_outbox_first_writes_to_a_socket_that_can_take_more(
    policy: SlowConsumerPolicy,
) -> None:
    outbox = Outbox(2, 1000, policy)
    written: list[bytes] = []

    def write_now() -> bool:
        written.extend(outbox.take())
        return True

    outbox.write_now = write_now
    for frame in (b"a", b"b", b"c", b"d", b"e"):
        assert outbox.push(frame) == QUEUED
    assert written + outbox.take() == [b"a", b"b", b"c", b"d", b"e"]
    assert outbox.closed is None
    assert outbox.missed == 0


def test_shutdown_keeps_pending_frames_for_the_final_flush() -> None:
    outbox = Outbox(10, 1000)
    wakes = Wakes(outbox)
    outbox.push(b"a")
    outbox.close(CloseReason.SHUTDOWN)
    outbox.close(CloseReason.SLOW_CONSUMER)  # the first reason stands
    assert outbox.closed is CloseReason.SHUTDOWN
    assert outbox.take() == [b"a"]
    assert wakes.count == 2
