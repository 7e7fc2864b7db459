"""``Later``: steps run in the step that sets it, failures pass on, ``every`` waits
for all, and awaiting one works as awaiting a future."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from broadcastd.broker import then
from broadcastd.errors import BrokerUnavailable
from broadcastd.later import Later, adopt, every


def test_steps_run_the_moment_it_is_set_in_order() -> None:
    ran: list[str] = []
    first: Later[int] = Later()
    second = first.then(lambda n: ran.append(f"step {n}") or n + 1)
    second.listen(lambda done: ran.append(f"listener {done.result()}"))
    assert ran == []
    first.set_result(1)
    assert ran == ["step 1", "listener 2"]  # no loop turn between
    assert second.result() == 2


def test_a_step_set_later_is_followed() -> None:
    first: Later[int] = Later()
    inner: Later[str] = Later()
    out = first.then(lambda _: inner)
    first.set_result(1)
    assert not out.done()
    inner.set_result("x")
    assert out.result() == "x"


def test_a_failure_passes_on_to_failed_or_through() -> None:
    first: Later[int] = Later()
    through = first.then(lambda n: n + 1)
    caught = first.then(lambda n: n + 1, lambda error: f"caught {error}")
    first.set_exception(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        through.result()
    assert caught.result() == "caught no"


def test_a_step_that_raises_fails_its_later_not_the_setter() -> None:
    first: Later[int] = Later()

    def broken(_: int) -> int:
        raise RuntimeError("bug")

    out = first.then(broken)
    first.set_result(1)  # does not raise
    error = out.exception()
    assert isinstance(error, RuntimeError)
    assert error.__traceback__ is not None  # a bug keeps where it happened


def refuse(_: int) -> int:
    raise BrokerUnavailable("Redis did not answer")


def test_a_refusal_in_a_step_leaves_no_cycle() -> None:
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            first: Later[int] = Later()
            out = first.then(refuse)
            first.set_result(1)
            assert out.exception() is not None
            del first, out
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, Later)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def test_set_once() -> None:
    later: Later[int] = Later()
    later.set_result(1)
    with pytest.raises(asyncio.InvalidStateError):
        later.set_result(2)
    with pytest.raises(asyncio.InvalidStateError):
        Later().result()


async def test_a_listener_that_raises_is_reported_and_the_others_still_hear() -> None:
    reported: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
    heard: list[int] = []
    later: Later[int] = Later()

    def broken(_: Later[int]) -> None:
        raise RuntimeError("bug")

    later.listen(broken)
    later.listen(lambda done: heard.append(done.result()))
    later.set_result(7)
    assert heard == [7]
    assert isinstance(reported[0]["exception"], RuntimeError)


def test_every_keeps_order_and_waits_for_all() -> None:
    a: Later[int] = Later()
    b: Later[int] = Later()
    out = every([a, 2, b])
    b.set_result(3)
    assert not out.done()
    a.set_result(1)
    assert out.result() == [1, 2, 3]
    assert every([1, 2]).result() == [1, 2]
    assert every([]).result() == []


def test_every_fails_with_the_first_failure_once_all_are_set() -> None:
    a: Later[int] = Later()
    b: Later[int] = Later()
    out = every([a, b])
    b.set_exception(KeyError("b"))
    assert not out.done()
    a.set_exception(KeyError("a"))
    assert isinstance(out.exception(), KeyError)
    assert str(out.exception()) == "'a'"


async def test_awaiting_a_later_and_a_coroutine_step() -> None:
    later: Later[int] = Later()
    asyncio.get_running_loop().call_soon(later.set_result, 5)
    assert await later == 5

    async def slow(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    first: Later[int] = Later()
    out = first.then(slow)
    first.set_result(4)
    assert await out == 8
    assert await adopt(slow(1)) == 2


async def test_then_chains_values_laters_and_coroutines_alike() -> None:
    assert then(1, lambda n: n + 1) == 2
    later: Later[int] = Later()
    chained = then(later, lambda n: n + 1)
    assert isinstance(chained, Later)
    later.set_result(1)
    assert chained.result() == 2

    async def two() -> int:
        return 2

    assert await then(two(), lambda n: n + 1) == 3  # type: ignore[misc]
    failing: Later[int] = Later()
    handled = then(failing, lambda n: n, lambda error: -1)
    failing.set_exception(OSError())
    assert handled.result() == -1  # type: ignore[union-attr]
