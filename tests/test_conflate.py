"""Per-channel policies of the outbox (push_to), conflate above all: unit tests of
the rules, then a property test of the guarantees over random interleavings."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcastd.core.envelope import Reply, frame_payload
from broadcastd.core.outbox import DROPPED, QUEUED, REFUSED, Budget, Outbox
from broadcastd.errors import CloseReason
from broadcastd.settings import SlowConsumerPolicy

from .conftest import Wakes
from .rawclient import RawClient

CONFLATE = SlowConsumerPolicy.CONFLATE
DROP_OLDEST = SlowConsumerPolicy.DROP_OLDEST
DISCONNECT = SlowConsumerPolicy.DISCONNECT


def event(frame: bytes) -> dict[str, Any] | None:
    """The event a frame carries, if it is a missed event built by the outbox."""
    if isinstance(frame, Reply) and frame[:1] == b"\x81":
        value: dict[str, Any] = orjson.loads(bytes(frame_payload(frame)))
        return value
    return None


def missed(channel: str, count: int) -> dict[str, Any]:
    return {"type": "missed", "channel": channel, "count": count}


def readable(frames: list[bytes]) -> list[bytes | dict[str, Any]]:
    """Frames as a test reads them: missed events decoded, the rest as they are."""
    return [event(frame) or frame for frame in frames]


def test_push_to_behaves_like_push_while_there_is_room() -> None:
    outbox = Outbox(10, 1000)
    wakes = Wakes(outbox)
    assert outbox.push_to(b"a1", "a", CONFLATE) == QUEUED
    assert outbox.push(b"x") == QUEUED
    assert outbox.push_to(b"a2", "a", CONFLATE) == QUEUED
    assert wakes.count == 1
    assert outbox.size == 5
    assert outbox.take() == [b"a1", b"x", b"a2"]
    assert outbox.size == 0
    assert outbox.take_channel_missed() == 0


def test_conflate_replaces_the_channels_newest_frame_in_place_and_tells_before_it() -> None:
    outbox = Outbox(3, 1000)
    outbox.push_to(b"a1", "a", CONFLATE)
    outbox.push_to(b"b1", "b", CONFLATE)
    outbox.push(b"x")
    assert outbox.push_to(b"a2", "a", CONFLATE) == DROPPED
    assert outbox.push_to(b"a3", "a", CONFLATE) == DROPPED
    assert outbox.push_to(b"b2", "b", CONFLATE) == DROPPED
    assert len(outbox) == 3
    assert outbox.closed is None
    assert readable(outbox.take()) == [missed("a", 2), b"a3", missed("b", 1), b"b2", b"x"]
    assert outbox.take_channel_missed() == 3
    assert outbox.take_missed() == 0  # per-channel losses are not the writer's to tell


def test_conflate_keeps_older_frames_of_the_channel_and_tells_just_before_the_newest() -> None:
    outbox = Outbox(2, 1000)
    outbox.push_to(b"a1", "a", CONFLATE)
    outbox.push_to(b"a2", "a", CONFLATE)
    assert outbox.push_to(b"a3", "a", CONFLATE) == DROPPED
    assert readable(outbox.take()) == [b"a1", missed("a", 1), b"a3"]


def test_conflate_appends_beyond_the_bound_for_a_channel_with_nothing_queued() -> None:
    outbox = Outbox(2, 1000)
    outbox.push(b"x")
    outbox.push(b"y")
    for name in ("a", "b", "c"):
        assert outbox.push_to(name.encode(), name, CONFLATE) == QUEUED
    assert outbox.push_to(b"A", "a", CONFLATE) == DROPPED
    assert len(outbox) == 2 + 3  # max_messages plus one frame per conflated channel
    assert readable(outbox.take()) == [b"x", b"y", missed("a", 1), b"A", b"b", b"c"]


def test_conflate_bound_in_bytes_is_one_frame_per_channel_beyond_max_bytes() -> None:
    outbox = Outbox(100, 10)
    outbox.push(b"12345678")
    assert outbox.push_to(b"aaaa", "a", CONFLATE) == QUEUED  # beyond the byte bound
    assert outbox.size == 12
    assert outbox.push_to(b"aaaaaaa", "a", CONFLATE) == DROPPED  # replaced, size follows
    assert outbox.size == 15
    assert readable(outbox.take()) == [b"12345678", missed("a", 1), b"aaaaaaa"]


def test_a_full_outbox_writes_out_before_conflating() -> None:
    outbox = Outbox(2, 1000)
    written: list[bytes] = []

    def write_now() -> bool:
        written.extend(outbox.take())
        return True

    outbox.write_now = write_now
    for frame in (b"a1", b"a2", b"a3", b"a4"):
        assert outbox.push_to(frame, "a", CONFLATE) == QUEUED
    assert written + outbox.take() == [b"a1", b"a2", b"a3", b"a4"]
    assert outbox.take_channel_missed() == 0


def test_replies_are_never_conflated() -> None:
    outbox = Outbox(1, 1000, DROP_OLDEST)
    outbox.push(Reply(b"r1"))
    assert outbox.push_to(b"a1", "a", CONFLATE) == QUEUED  # beyond the bound
    assert outbox.push_to(b"a2", "a", CONFLATE) == DROPPED  # replaces a1, not r1
    assert readable(outbox.take()) == [b"r1", missed("a", 1), b"a2"]
    # A Reply given to push_to is a reply all the same: pushed, never tagged.
    outbox.push(Reply(b"r2"))
    assert outbox.push_to(Reply(b"r3"), "a", CONFLATE) == REFUSED  # as push(): only replies
    assert outbox.closed is CloseReason.SLOW_CONSUMER


def test_the_frames_policy_decides_not_the_outboxs() -> None:
    outbox = Outbox(2, 1000, DROP_OLDEST)
    outbox.push_to(b"a1", "a", DISCONNECT)
    outbox.push_to(b"a2", "a", DISCONNECT)
    assert outbox.push_to(b"a3", "a", DISCONNECT) == REFUSED
    assert outbox.closed is CloseReason.SLOW_CONSUMER
    assert outbox.take() == []


def test_drop_oldest_through_push_to_counts_per_channel_and_tells_before_the_next() -> None:
    outbox = Outbox(3, 1000)
    outbox.push_to(b"a1", "a", DROP_OLDEST)
    outbox.push_to(b"b1", "b", DROP_OLDEST)
    outbox.push_to(b"a2", "a", DROP_OLDEST)
    assert outbox.push_to(b"a3", "a", DROP_OLDEST) == DROPPED  # drops a1
    assert outbox.push_to(b"a4", "a", DROP_OLDEST) == DROPPED  # drops b1
    assert readable(outbox.take()) == [missed("a", 1), b"a2", b"a3", b"a4"]
    # b1 was dropped and b has no frame queued after it: told before its next one.
    assert outbox.untold() == {"b": 1}
    outbox.push_to(b"b3", "b", DROP_OLDEST)
    assert readable(outbox.take()) == [missed("b", 1), b"b3"]
    assert outbox.untold() == {}
    assert outbox.take_channel_missed() == 2


def test_drop_oldest_never_drops_the_newest_frame_of_a_conflated_channel() -> None:
    outbox = Outbox(3, 1000, DROP_OLDEST)
    outbox.push_to(b"c1", "c", CONFLATE)
    outbox.push(b"x1")
    outbox.push(b"x2")
    assert outbox.push(b"x3") == DROPPED
    assert outbox.take() == [b"c1", b"x2", b"x3"]
    assert outbox.take_missed() == 1


def test_drop_oldest_drops_older_frames_of_a_conflated_channel() -> None:
    outbox = Outbox(3, 1000, DROP_OLDEST)
    outbox.push_to(b"c1", "c", CONFLATE)
    outbox.push_to(b"c2", "c", CONFLATE)
    outbox.push(b"x1")
    assert outbox.push(b"x2") == DROPPED
    assert readable(outbox.take()) == [missed("c", 1), b"c2", b"x1", b"x2"]


def test_a_dropped_frames_missed_count_moves_to_the_channels_next_frame() -> None:
    outbox = Outbox(3, 1000, DROP_OLDEST)
    outbox.push_to(b"a1", "a", DROP_OLDEST)
    outbox.push_to(b"a2", "a", CONFLATE)
    outbox.push(b"x1")
    assert outbox.push_to(b"a3", "a", CONFLATE) == DROPPED  # a2 conflated into a3
    assert outbox.push(b"x2") == DROPPED  # drops a1, the oldest
    assert readable(outbox.take()) == [missed("a", 2), b"a3", b"x1", b"x2"]


def test_a_refused_frame_is_told_before_the_channels_next_one() -> None:
    outbox = Outbox(2, 1000)
    outbox.push(Reply(b"r1"))
    outbox.push(Reply(b"r2"))
    assert outbox.push_to(b"a1", "a", DROP_OLDEST) == REFUSED  # only replies to drop
    assert outbox.closed is None
    assert outbox.untold() == {"a": 1}
    assert outbox.take() == [b"r1", b"r2"]
    outbox.push_to(b"a2", "a", DROP_OLDEST)
    assert outbox.untold() == {"a": 1}  # now waiting for take()
    assert readable(outbox.take()) == [missed("a", 1), b"a2"]


def test_a_replacing_frame_also_tells_what_was_refused_before_it() -> None:
    outbox = Outbox(2, 1000)
    outbox.push(Reply(b"r"))
    outbox.push_to(b"a1", "a", CONFLATE)
    assert outbox.push_to(b"a2", "a", DROP_OLDEST) == REFUSED  # its policy changed
    assert outbox.push_to(b"a3", "a", CONFLATE) == DROPPED  # replaces a1
    assert readable(outbox.take()) == [b"r", missed("a", 2), b"a3"]
    assert outbox.untold() == {}


def test_a_conflate_outbox_drops_the_oldest_for_untagged_frames() -> None:
    outbox = Outbox(2, 1000, CONFLATE)
    outbox.push(b"x1")
    outbox.push(b"x2")
    assert outbox.push(b"x3") == DROPPED
    assert outbox.closed is None
    assert outbox.take() == [b"x2", b"x3"]
    assert outbox.take_missed() == 1


def test_raw_clients_are_not_told_but_losses_are_counted() -> None:
    outbox = Outbox(1, 1000)
    outbox.tell_missed = False
    outbox.push_to(b"a1", "a", CONFLATE)
    outbox.push_to(b"a2", "a", CONFLATE)
    outbox.push_to(b"b1", "b", DROP_OLDEST)  # refused: a2 is conflated, not dropped
    assert outbox.take() == [b"a2"]
    assert outbox.untold() == {}
    assert outbox.take_channel_missed() == 2


def test_forget_stops_conflating_into_an_old_subscriptions_frame() -> None:
    outbox = Outbox(3, 1000)
    outbox.push_to(b"a1", "a", CONFLATE)
    outbox.forget("a")
    outbox.push(Reply(b"subscribed"))
    outbox.push(b"a-replayed")  # a replay after a new subscribe comes through push()
    assert outbox.push_to(b"a2", "a", CONFLATE) == QUEUED  # appended, not over a1
    assert outbox.take() == [b"a1", b"subscribed", b"a-replayed", b"a2"]


def test_forget_drops_what_waits_for_the_channels_next_message() -> None:
    outbox = Outbox(1, 1000)
    outbox.push(Reply(b"r"))
    outbox.push_to(b"a1", "a", DROP_OLDEST)
    assert outbox.untold() == {"a": 1}
    outbox.forget("a")
    assert outbox.untold() == {}


def test_a_slow_consumer_close_forgets_the_tags() -> None:
    outbox = Outbox(1, 1000)
    outbox.push_to(b"a1", "a", CONFLATE)
    outbox.push_to(b"a2", "a", CONFLATE)
    outbox.push(b"x")  # the outbox's own policy: disconnect
    assert outbox.closed is CloseReason.SLOW_CONSUMER
    assert outbox.take() == []
    assert outbox.untold() == {}
    assert outbox.push_to(b"a3", "a", CONFLATE) == REFUSED


# Namespace budgets: a share of the outbox per namespace.


def test_a_flooded_namespace_drops_its_own_oldest_not_another_namespaces() -> None:
    prices = Budget("px", max_messages=2, max_bytes=1000)
    outbox = Outbox(8, 1000, DROP_OLDEST)
    outbox.push_to(b"o1", "orders:a", DROP_OLDEST)
    outbox.push(b"x1")
    for n in range(1, 11):
        outbox.push_to(b"p%d" % n, "px:feed", DROP_OLDEST, prices)
        assert outbox.usage(prices)[0] <= 2
    outbox.push_to(b"o2", "orders:a", DROP_OLDEST)
    assert readable(outbox.take()) == [
        b"o1",
        b"x1",
        missed("px:feed", 8),
        b"p9",
        b"p10",
        b"o2",
    ]
    assert outbox.usage(prices) == (0, 0)


def test_a_budget_counts_bytes_and_conflates_within_its_share() -> None:
    prices = Budget("px", max_messages=100, max_bytes=10)
    outbox = Outbox(100, 1000, DISCONNECT)
    assert outbox.push_to(b"a-1.", "px:a", CONFLATE, prices) == QUEUED
    assert outbox.push_to(b"b-1.", "px:b", CONFLATE, prices) == QUEUED
    assert outbox.push_to(b"a-2.", "px:a", CONFLATE, prices) == DROPPED  # 12 > 10 bytes
    assert outbox.push_to(b"b-2..", "px:b", CONFLATE, prices) == DROPPED
    assert outbox.usage(prices) == (2, 9)
    outbox.push(b"x")  # the outbox's own bounds are far: not a slow consumer
    assert outbox.closed is None
    assert readable(outbox.take()) == [
        missed("px:a", 1),
        b"a-2.",
        missed("px:b", 1),
        b"b-2..",
        b"x",
    ]


def test_a_full_budget_with_disconnect_closes_the_client() -> None:
    outbox = Outbox(100, 1000, DROP_OLDEST)
    budget = Budget("strict", max_messages=1, max_bytes=1000)
    outbox.push_to(b"s1", "strict:a", DISCONNECT, budget)
    assert outbox.push_to(b"s2", "strict:a", DISCONNECT, budget) == REFUSED
    assert outbox.closed is CloseReason.SLOW_CONSUMER


# The property test. Channels c0..c9, each with its own policy (or a mixed one,
# drawn per push); "u" is a channel pushed with push() under the outbox's policy;
# replies are numbered. Offsets count from 1 per channel, so a delivered frame's
# missed count is exactly the gap since the previous delivered frame of its channel.

CHANNELS = [f"c{n}" for n in range(10)]
MIXED = None
"""A channel whose policy changes from push to push (a namespace reconfigured)."""

# (what, channel, size): what is a percentile, so that pushes outnumber takes and
# the outbox is full most of the time.
operations = st.lists(
    st.tuples(st.integers(0, 99), st.integers(0, len(CHANNELS) - 1), st.integers(0, 12)),
    min_size=40,
    max_size=400,
)


def what(percentile: int) -> str:
    for limit, op in ((60, "push_to"), (75, "push"), (80, "reply"), (88, "take")):
        if percentile < limit:
            return op
    return "writable"


@settings(max_examples=400, deadline=None)
@given(
    max_messages=st.integers(1, 8),
    max_bytes=st.integers(32, 120),
    outbox_policy=st.sampled_from([DROP_OLDEST, CONFLATE, CONFLATE, DISCONNECT]),
    policies=st.lists(
        st.sampled_from([CONFLATE, CONFLATE, DROP_OLDEST, MIXED]), min_size=10, max_size=10
    ),
    shares=st.lists(st.none() | st.tuples(st.integers(1, 6), st.integers(16, 100)), min_size=2),
    ops=operations,
)
def test_conflation_keeps_order_counts_and_the_newest_of_every_channel(
    max_messages: int,
    max_bytes: int,
    outbox_policy: SlowConsumerPolicy,
    policies: list[SlowConsumerPolicy | None],
    shares: list[tuple[int, int] | None],
    ops: list[tuple[int, int, int]],
) -> None:
    """Also with namespace budgets: c0..c4 share the first (if any), c5..c9 the second."""
    budgets = [None if share is None else Budget(f"n{i}", *share) for i, share in enumerate(shares)]
    budget_of = [budgets[n // 5] for n in range(len(CHANNELS))]
    outbox = Outbox(max_messages, max_bytes, outbox_policy)
    delivered: list[bytes] = []
    can_write = False

    def write_now() -> bool:
        if can_write:
            delivered.extend(outbox.take())
        return can_write

    outbox.write_now = write_now
    conflating = sum(policy is not DROP_OLDEST for policy in policies)
    largest = 0
    pushed: dict[str, int] = dict.fromkeys([*CHANNELS, "u"], 0)
    replies = 0
    for percentile, n, pad in ops:
        op = what(percentile)
        if op == "push_to":
            name = CHANNELS[n]
            pushed[name] += 1
            frame = b"%s:%d:%s" % (name.encode(), pushed[name], b"." * pad)
            largest = max(largest, len(frame))
            policy = policies[n] or (CONFLATE if pad % 2 else DROP_OLDEST)
            outbox.push_to(frame, name, policy, budget_of[n])
        elif op == "push":
            pushed["u"] += 1
            frame = b"u:%d:%s" % (pushed["u"], b"." * pad)
            largest = max(largest, len(frame))
            outbox.push(frame)
        elif op == "reply":
            replies += 1
            outbox.push(Reply(b"r:%d" % replies))
        elif op == "take":
            delivered.extend(outbox.take())
        else:
            can_write = not can_write
        if outbox.closed is not None:
            break
        # The bound: one frame (of any size) per conflated channel beyond the limits.
        assert len(outbox) <= max_messages + conflating
        assert outbox.size <= max_bytes + conflating * largest
        queued = outbox._queue
        for share, budget in enumerate(budgets[:2]):
            if budget is None:
                continue
            mine = [f for f in queued if f[:1] == b"c" and int(f[1:2]) // 5 == share]
            assert outbox.usage(budget) == (len(mine), sum(map(len, mine)))
            held = sum(p is not DROP_OLDEST for p in policies[share * 5 : share * 5 + 5])
            assert len(mine) <= budget.max_messages + held
            assert sum(map(len, mine)) <= budget.max_bytes + held * largest
    delivered.extend(outbox.take())

    last: dict[str, int] = dict.fromkeys(pushed, 0)
    told: dict[str, int] = dict.fromkeys(pushed, 0)
    seen_replies = 0
    pending: dict[str, Any] | None = None
    for frame in delivered:
        missed_event = event(frame)
        if missed_event is not None:
            assert pending is None
            pending = missed_event
            continue
        if isinstance(frame, Reply):
            assert pending is None
            seen_replies += 1
            assert frame == b"r:%d" % seen_replies  # in order, none lost
            continue
        name, offset_text, _ = frame.decode().split(":")
        offset = int(offset_text)
        assert offset > last[name]  # per-channel order
        gap = offset - last[name] - 1
        if name == "u":
            assert pending is None
        else:
            # Every loss is told just before the channel's next delivered frame.
            count = 0
            if pending is not None:
                assert pending["channel"] == name
                count = pending["count"]
                pending = None
            assert count == gap
            told[name] += count
        last[name] = offset
    assert pending is None

    if outbox.closed is not None:
        assert outbox.closed is CloseReason.SLOW_CONSUMER
        return
    assert seen_replies == replies
    untold = outbox.untold()
    for n, name in enumerate(CHANNELS):
        # Counts add up: every message is delivered, told as missed, or still to tell.
        assert pushed[name] - last[name] == untold.get(name, 0)
        if policies[n] is CONFLATE:
            assert last[name] == pushed[name]  # the newest always arrives
    assert outbox.take_channel_missed() == sum(told.values()) + sum(untold.values())
    delivered_u = sum(1 for frame in delivered if frame.startswith(b"u:"))
    assert delivered_u + outbox.take_missed() == pushed["u"]


async def test_conflate_as_the_servers_policy_conflates_every_channel(
    daemon_factory: Any,
) -> None:
    """``ws.slow_consumer_policy = "conflate"`` with no namespace: a client that
    stopped reading gets each channel's latest message and a per-channel missed."""
    settings = {
        "ws__slow_consumer_policy": "conflate",
        "ws__outbox_messages": 16,
        "ws__write_limit": 16 * 1024,
        "ws__ping_interval": None,
    }
    async with daemon_factory(**settings) as d:
        client = await RawClient.connect(f"{d.ws_url}/?channel=a&channel=b")
        await client.handshake()
        while len(client.text_frames()) < 2:
            await client.read_events()
        ((_, conn),) = d.daemon.ws.connections()
        last: dict[str, int] = {}
        rounds = after_pause = 0
        while after_pause < 50:  # once writes pause, well past the outbox's 16 frames
            rounds += 1
            after_pause += conn.write_paused
            for channel in ("a", "b"):
                answer = await d.publish(channel, {"n": rounds, "pad": "x" * 4000})
                last[channel] = answer["offset"]
        got: dict[str, int] = {}
        missed: list[dict[str, Any]] = []
        while got != last:
            await client.read_events()
            messages = [json.loads(text) for text in client.text_frames()[2:]]
            got = {m["channel"]: m["offset"] for m in messages if "offset" in m}
            missed = [m for m in messages if m.get("type") == "missed"]
        assert missed
        assert all("channel" in m for m in missed), missed[:3]
        client.close()
