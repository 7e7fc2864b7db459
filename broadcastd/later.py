"""``Later``: an answer still to come, whose steps run the moment it comes.

Why not an asyncio Future: a future runs each of its callbacks in a later turn
of the event loop, and a coroutine that awaits it needs a task. Between Redis's
reply to a publish and the HTTP answer there are four steps (the engine decodes
the reply, the node counts the publish, the route builds its document, the
framing renders it); as a task awaiting a chain of coroutines they cost the
node about a fifth of its CPU per publish (py-spy, benchmark S3 on Redis: the
task alone 11 %). A Later
runs them in the step that resolves it (the Redis connection's
``data_received``): no task, no turn of the loop. Whoever awaits a Later (a
test, a tool) gets a future made for it then.

A step's exception fails the Later that ``then`` returned, never the code that
set the first one; a listener that raises is reported to the event loop's
exception handler, and the other listeners still hear.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, TypeVar, cast

from broadcastd.errors import ClientError

T = TypeVar("T")
U = TypeVar("U")

_PENDING, _DONE, _FAILED = 0, 1, 2


class Later(Generic[T]):
    """A value or an exception to come, set once (``set_result``, ``set_exception``,
    as on a Future, so that a connection can resolve either)."""

    __slots__ = ("_listeners", "_state", "_value")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: Any = None
        """The result, or the exception once failed."""
        self._listeners: list[Callable[[Later[T]], None]] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return False  # a Later cannot be cancelled: its caller stops listening

    def set_result(self, value: T) -> None:
        if self._state:
            raise asyncio.InvalidStateError("a Later is set once")
        self._state = _DONE
        self._value = value
        self._fire()

    def set_exception(self, error: BaseException) -> None:
        if self._state:
            raise asyncio.InvalidStateError("a Later is set once")
        self._state = _FAILED
        self._value = error
        self._fire()

    def result(self) -> T:
        if self._state == _DONE:
            return cast(T, self._value)
        if self._state == _FAILED:
            raise cast(BaseException, self._value)
        raise asyncio.InvalidStateError("not set yet")

    def exception(self) -> BaseException | None:
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("not set yet")
        return cast(BaseException, self._value) if self._state == _FAILED else None

    def listen(self, listener: Callable[[Later[T]], None]) -> None:
        """Call ``listener(self)`` once set (now, if it is)."""
        if self._state:
            listener(self)
        elif self._listeners is None:
            self._listeners = [listener]
        else:
            self._listeners.append(listener)

    def _fire(self) -> None:
        listeners, self._listeners = self._listeners, None
        if listeners is not None:
            for listener in listeners:
                try:
                    listener(self)
                except Exception as exc:  # a bug in one listener: the others still hear
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "a Later's listener raised", "exception": exc}
                    )

    def then(
        self,
        step: Callable[[T], U | Awaitable[U]],
        failed: Callable[[BaseException], U | Awaitable[U]] | None = None,
    ) -> Later[U]:
        """A Later of ``step(result)``, or of ``failed(exception)`` (without
        ``failed``, the exception passes on); what either raises fails it."""
        out: Later[U] = Later()

        def run(done: Later[T]) -> None:
            try:
                if done._state == _DONE:
                    value = step(cast(T, done._value))
                elif failed is not None:
                    value = failed(cast(BaseException, done._value))
                else:
                    out.set_exception(cast(BaseException, done._value))
                    return
            except Exception as exc:
                if isinstance(exc, ClientError):
                    # A refusal, not a bug: its traceback would only hold this frame,
                    # which holds ``out``, which holds it (a cycle only the
                    # collector frees, which the daemon runs rarely).
                    exc.__traceback__ = None
                out.set_exception(exc)
                return
            if isinstance(value, Later):
                value.listen(out._copy)
            elif isinstance(value, _AWAITABLES):  # a step that must wait its own way
                adopt(value).listen(out._copy)
            else:
                out.set_result(cast(U, value))

        self.listen(run)
        return out

    def _copy(self, done: Later[T]) -> None:
        if done._state == _DONE:
            self.set_result(cast(T, done._value))
        else:
            self.set_exception(cast(BaseException, done._value))

    def __await__(self) -> Generator[Any, None, T]:
        if not self._state:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(_: Later[T]) -> None:
                if not future.done():
                    future.set_result(None)

            self.listen(wake)
            yield from future
        return self.result()


_AWAITABLES = (types.CoroutineType, asyncio.Future)


def adopt(awaitable: Awaitable[T]) -> Later[T]:
    """A Later of a coroutine's or a future's outcome (a coroutine runs as a task)."""
    out: Later[T] = Later()

    def settle(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            out.set_exception(asyncio.CancelledError())
        elif (error := done.exception()) is not None:
            out.set_exception(error)
        else:
            out.set_result(done.result())

    asyncio.ensure_future(awaitable).add_done_callback(settle)
    return out


def every(answers: Sequence[T | Later[T]]) -> Later[list[T]]:
    """A Later of every answer, in order, once the last is set; if any failed, of
    the first failure (set only once all are, so that nothing is left unheard)."""
    out: Later[list[T]] = Later()
    left = sum(1 for answer in answers if isinstance(answer, Later))

    def one_more(_: Later[T]) -> None:
        nonlocal left
        left -= 1
        if left:
            return
        values: list[T] = []
        for answer in answers:
            if isinstance(answer, Later):
                if answer._state == _FAILED:
                    out.set_exception(cast(BaseException, answer._value))
                    return
                values.append(cast(T, answer._value))
            else:
                values.append(answer)
        out.set_result(values)

    if not left:
        out.set_result(list(cast(Sequence[T], answers)))
    for answer in answers:
        if isinstance(answer, Later):
            answer.listen(one_more)
    return out
