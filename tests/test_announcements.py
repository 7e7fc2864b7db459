"""Join and leave events told in slices (``core.announcements``), in process:
bounded work per slice and one slice due at a time, each channel's order, a
message's events told before it, the subscribers of the moment, one life of a
channel; then against a model under random events, slices, messages and
members coming and going; then through a node's sessions (the client is never
told of itself, raw event streams are told too)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broadcastd.core.announcements import Announcements
from broadcastd.core.envelope import Reply, frame_payload, reply_frame
from broadcastd.core.eventstream import NDJSON, SSE, EventStream, Messages
from broadcastd.core.forms import Form
from broadcastd.core.hub import Hub
from broadcastd.core.outbox import Outbox
from broadcastd.core.session import Session
from broadcastd.core.stream import Position
from broadcastd.node import Node

from .conftest import make_settings


def event(channel: str, n: int) -> Reply:
    return reply_frame({"type": "join", "channel": channel, "client": str(n), "user": None})


class Room:
    """A hub and its members' outboxes."""

    def __init__(self) -> None:
        self.hub = Hub()
        self.told = Announcements(self.hub.get)

    def add(self, channel: str, count: int, form: Form = Form.FRAME) -> list[Outbox]:
        joined = self.hub.get(channel) or self.hub.add(channel, Position("e", 0))
        boxes = [Outbox(10_000, 10**9) for _ in range(count)]
        for box in boxes:
            self.hub.join(joined, box, form)
        return boxes

    def event(self, channel: str, frame: Reply, skip: Outbox | None = None) -> bool:
        joined = self.hub.get(channel)
        assert joined is not None
        return self.told.add(joined, frame, skip)

    def tell(self, channel: str) -> None:
        joined = self.hub.get(channel)
        assert joined is not None
        self.told.tell(joined)


def test_events_go_out_in_slices_of_bounded_pushes_in_order() -> None:
    room = Room()
    boxes = room.add("a", 5)
    assert room.event("a", event("a", 1)) is True
    assert room.event("a", event("a", 2)) is False
    assert room.event("a", event("a", 3)) is False
    slices = 0
    while True:
        before = sum(len(box) for box in boxes)
        more = room.told.run(budget=4)
        assert sum(len(box) for box in boxes) - before <= 4
        slices += 1
        if not more:
            break
    assert slices == 4  # 15 pushes, 4 at a time
    for box in boxes:
        assert box.take() == [event("a", 1), event("a", 2), event("a", 3)]
    assert not room.told


def test_one_slice_is_due_at_a_time_even_when_a_message_told_everything() -> None:
    room = Room()
    room.add("a", 2)
    assert room.event("a", event("a", 1)) is True
    room.tell("a")  # a message came: the queue is empty, the slice is still due
    assert room.event("a", event("a", 2)) is False
    assert room.told.run() is False
    assert room.event("a", event("a", 3)) is True


def test_raw_websockets_are_not_told_events_and_raw_streams_are() -> None:
    room = Room()
    (raw_ws,) = room.add("a", 1, Form.RAW_FRAME)
    streams = [room.add("a", 1, form)[0] for form in Form if form is not Form.RAW_FRAME]
    room.event("a", event("a", 1))
    room.told.run()
    assert len(raw_ws) == 0
    assert all(len(box) == 1 for box in streams)


def test_a_client_is_not_told_of_itself_and_a_member_gone_is_not_told() -> None:
    room = Room()
    own, other, gone = room.add("a", 3)
    room.event("a", event("a", 1), skip=own)
    room.hub.leave(gone, "a")
    room.told.run()
    assert (len(own), len(other), len(gone)) == (0, 1, 0)


def test_a_member_that_leaves_while_an_event_is_part_told_is_not_told_the_rest() -> None:
    room = Room()
    boxes = room.add("a", 6)
    room.event("a", event("a", 1))
    room.told.run(budget=2)
    untold = [box for box in boxes if not len(box)]
    room.hub.leave(untold[0], "a")
    room.hub.leave(untold[1], "a")
    room.told.run(budget=1)
    room.hub.leave(untold[2], "a")
    room.tell("a")
    assert [len(box) for box in untold] == [0, 0, 1, 1]
    assert sum(len(box) for box in boxes) == 4


def test_events_of_a_channel_that_left_the_hub_are_not_told_to_its_next_life() -> None:
    room = Room()
    (x,) = room.add("a", 1)
    room.event("a", event("a", 1))
    room.hub.leave(x, "a")  # the last subscriber: the channel leaves the hub
    (z,) = room.add("a", 1)
    assert room.told.run() is False
    assert len(z) == 0
    assert not room.told


def test_a_message_s_events_are_told_before_it_and_other_channels_wait() -> None:
    room = Room()
    a_boxes, b_boxes = room.add("a", 3), room.add("b", 3)
    room.event("a", event("a", 1))
    room.event("b", event("b", 1))
    room.event("a", event("a", 2))
    room.told.run(budget=2)  # the first event of "a" reached two of three
    room.tell("a")
    assert all(box.take() == [event("a", 1), event("a", 2)] for box in a_boxes)
    assert all(len(box) == 0 for box in b_boxes)
    assert room.hub.get("b") in room.told
    assert room.told.run() is False
    assert all(box.take() == [event("b", 1)] for box in b_boxes)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("event"), st.sampled_from("abc")),
            st.tuples(st.just("slice"), st.integers(1, 7)),
            st.tuples(st.just("message"), st.sampled_from("abc")),
            st.tuples(st.just("member"), st.sampled_from("abc")),
            st.tuples(st.just("leave"), st.sampled_from("abc")),
        ),
        max_size=60,
    )
)
def test_every_member_gets_each_channel_s_events_once_in_order(ops: list[Any]) -> None:
    """Model: each member is told its channel's events once each, in order;
    everything added while it was there if it stayed, nothing added after it
    left; a message of a channel finds all of that channel's earlier events told.
    The first two members of each channel stay throughout."""
    room = Room()
    steady = {channel: room.add(channel, 2) for channel in "abc"}
    added: dict[str, list[Reply]] = {channel: [] for channel in "abc"}
    got: dict[int, list[Reply]] = {}
    boxes: list[Outbox] = [box for group in steady.values() for box in group]
    gone: dict[int, int] = {}
    """A member that left -> how many events of its channel had been added then."""
    comers: dict[int, tuple[str, int]] = {}

    def collect() -> None:
        for box in boxes:
            got.setdefault(id(box), []).extend(box.take())

    n = 0
    for op, arg in ops:
        if op == "event":
            n += 1
            frame = event(arg, n)
            added[arg].append(frame)
            room.event(arg, frame)
        elif op == "slice":
            room.told.run(budget=arg)
        elif op == "member":
            (box,) = room.add(arg, 1)
            boxes.append(box)
            comers[id(box)] = (arg, len(added[arg]))
        elif op == "leave":
            leaving = [box for box in boxes if id(box) in comers and id(box) not in gone]
            leaving = [box for box in leaving if comers[id(box)][0] == arg]
            if leaving:
                room.hub.leave(leaving[0], arg)
                gone[id(leaving[0])] = len(added[arg])
        elif room.hub.get(arg) in room.told:
            room.tell(arg)
            collect()
            for box in steady[arg]:
                assert got.get(id(box), []) == added[arg]
    while room.told.run(budget=3):
        pass
    collect()
    for channel in "abc":
        for box in steady[channel]:
            assert got.get(id(box), []) == added[channel]
    for box in boxes:
        if id(box) not in comers:
            continue
        channel, before = comers[id(box)]
        seen = got.get(id(box), [])
        assert len(set(map(bytes, seen))) == len(seen)
        assert [frame for frame in added[channel] if frame in seen] == seen
        if id(box) in gone:  # told nothing added after it left (some before, perhaps)
            assert all(frame in added[channel][: gone[id(box)]] for frame in seen)
        else:  # told everything added since it came (what came before, perhaps)
            assert all(frame in seen for frame in added[channel][before:])
    assert not room.told


# Through a node and its sessions


async def turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)  # let the loop run the slices due


def kinds(outbox: Outbox) -> list[tuple[str, str]]:
    import json

    frames = [json.loads(bytes(frame_payload(frame))) for frame in outbox.take()]
    return [(f["type"], f.get("client", "")) for f in frames if f["type"] in ("join", "leave")]


async def test_a_client_that_leaves_and_comes_back_at_once_is_not_told_of_itself() -> None:
    node = Node(make_settings(namespaces=[{"name": "jl", "presence": True, "join_leave": True}]))
    await node.start()
    try:
        other = Session("other", node, Outbox(100, 10**6))
        other.open(["jl:room"])
        x = Session("x", node, Outbox(100, 10**6))
        x.open(["jl:room"])
        await turns()
        x.outbox.take()
        other.outbox.take()
        x.unsubscribe_by_server("jl:room")
        x.subscribe_by_server("jl:room", None)
        await turns()
        assert kinds(x.outbox) == []
        assert kinds(other.outbox) == [("leave", "x"), ("join", "x")]
    finally:
        await node.close()


async def test_raw_event_streams_are_told_joins_as_events_and_lines() -> None:
    node = Node(make_settings(namespaces=[{"name": "jl", "presence": True, "join_leave": True}]))
    await node.start()
    try:
        streams = []
        for kind in (SSE, NDJSON):
            stream = EventStream(kind, ("jl:room",), raw=True)
            form, forms = stream.forms()
            session = Session(f"s-{kind}", node, Outbox(100, 10**6), form=form, forms=forms)
            session.open(["jl:room"])
            streams.append((stream, session))
        await turns()
        for _, session in streams:
            session.outbox.take()
        Session("other", node, Outbox(100, 10**6)).open(["jl:room"])
        await turns()
        sse, ndjson = (stream.render(s.outbox.take(), Messages()) for stream, s in streams)
        assert b"event: join\n" in sse
        assert b'"type":"join"' in ndjson
    finally:
        await node.close()
