"""Join and leave events told in slices (``core.announcements``), in process:
bounded work per slice, each channel's order, a message's events told before
it, and the subscribers of the moment; then against a model under random
events, slices, messages and members coming and going."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broadcastd.core.announcements import Announcements
from broadcastd.core.envelope import Reply, reply_frame
from broadcastd.core.outbox import Outbox


def event(channel: str, n: int) -> Reply:
    return reply_frame({"type": "join", "channel": channel, "client": str(n), "user": None})


class Room:
    """Channels and their members (outboxes), as the hub would answer."""

    def __init__(self) -> None:
        self.members: dict[str, list[Outbox]] = {}

    def add(self, channel: str, count: int) -> list[Outbox]:
        boxes = [Outbox(10_000, 10**9) for _ in range(count)]
        self.members.setdefault(channel, []).extend(boxes)
        return boxes

    def __call__(self, channel: str) -> list[Outbox]:
        return list(self.members.get(channel, ()))


def test_events_go_out_in_slices_of_bounded_pushes_in_order() -> None:
    room, told = Room(), Announcements()
    boxes = room.add("a", 5)
    assert told.add("a", event("a", 1)) is True
    assert told.add("a", event("a", 2)) is False
    assert told.add("a", event("a", 3)) is False
    slices = 0
    while True:
        before = sum(len(box) for box in boxes)
        more = told.run(room, budget=4)
        assert sum(len(box) for box in boxes) - before <= 4
        slices += 1
        if not more:
            break
    assert slices == 4  # 15 pushes, 4 at a time
    for box in boxes:
        assert box.take() == [event("a", 1), event("a", 2), event("a", 3)]
    assert not told.waiting


def test_a_client_is_not_told_its_own_join_and_a_member_gone_is_not_told() -> None:
    room, told = Room(), Announcements()
    own, other, gone = room.add("a", 3)
    told.add("a", event("a", 1), skip=own)
    room.members["a"].remove(gone)
    told.run(room)
    assert (len(own), len(other), len(gone)) == (0, 1, 0)


def test_a_message_s_events_are_told_before_it_and_other_channels_wait() -> None:
    room, told = Room(), Announcements()
    a_boxes, b_boxes = room.add("a", 3), room.add("b", 3)
    told.add("a", event("a", 1))
    told.add("b", event("b", 1))
    told.add("a", event("a", 2))
    told.run(room, budget=2)  # the first event of "a" reached two of three
    told.tell("a", room)
    assert all(box.take() == [event("a", 1), event("a", 2)] for box in a_boxes)
    assert all(len(box) == 0 for box in b_boxes)
    assert told.waiting == {"b": 1}
    assert told.run(room) is False
    assert all(box.take() == [event("b", 1)] for box in b_boxes)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("event"), st.sampled_from("abc")),
            st.tuples(st.just("slice"), st.integers(1, 7)),
            st.tuples(st.just("message"), st.sampled_from("abc")),
            st.tuples(st.just("member"), st.sampled_from("abc")),
        ),
        max_size=60,
    )
)
def test_every_member_gets_each_channel_s_events_once_in_order(ops: list[Any]) -> None:
    """Model: an event reaches every member present from its add until all
    slices are run, once, in its channel's order; a message of a channel finds
    all of that channel's earlier events told."""
    room, told = Room(), Announcements()
    for channel in "abc":
        room.add(channel, 2)
    added: dict[str, list[Reply]] = {channel: [] for channel in "abc"}
    steady = {channel: list(room.members[channel]) for channel in "abc"}
    got: dict[int, list[Reply]] = {}

    def collect() -> None:
        for box in (box for boxes in room.members.values() for box in boxes):
            got.setdefault(id(box), []).extend(box.take())

    n = 0
    for op, arg in ops:
        if op == "event":
            n += 1
            frame = event(arg, n)
            added[arg].append(frame)
            told.add(arg, frame)
        elif op == "slice":
            told.run(room, budget=arg)
        elif op == "member":
            room.add(arg, 1)
        elif arg in told.waiting:
            told.tell(arg, room)
            collect()
            for box in steady[arg]:
                assert got.get(id(box), []) == added[arg]
    while told.run(room, budget=3):
        pass
    collect()
    for channel in "abc":
        for box in steady[channel]:
            assert got.get(id(box), []) == added[channel]
        for box in room.members[channel]:
            seen = got.get(id(box), [])
            assert len(set(map(bytes, seen))) == len(seen)
            assert [frame for frame in added[channel] if frame in seen] == seen
    assert not told.waiting
    assert len(told) == 0
