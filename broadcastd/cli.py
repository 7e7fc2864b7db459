"""``broadcastd serve | check-config | publish | subscribe | presence | ...``.

The other commands: ``connections``, ``disconnect`` and ``info``.

Every setting is also a flag of ``serve`` and ``check-config``: ``ws.port``
becomes ``--ws-port``, ``drain_timeout`` becomes ``--drain-timeout``. Flags
override the environment, which overrides the TOML file. The client commands
(``publish``, ``subscribe`` and the server API's ``presence``,
``connections``, ``disconnect``, ``info``) read the same configuration to find
the daemon and its control token, so on a host where the daemon runs they need
no flags at all. The server API's commands print JSON lines, one per entry, for
``jq`` and the like.

Exit status: 0 success, 1 a runtime failure (the daemon refused or could not
be reached, or could not start), 2 a usage or configuration error; 128 + the
signal number when ``subscribe`` is ended by SIGINT (130) or SIGTERM (143),
and 141 (SIGPIPE's) when the reader of its output has gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import select
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, get_args

from pydantic import BaseModel

from broadcastd import __version__, log
from broadcastd.client.backoff import Backoff as Backoff
from broadcastd.client.connection import DEFAULT_MAX_SIZE
from broadcastd.client.events import Event, Message, Missed, Recovered, Subscribed
from broadcastd.client.events import Position as Position
from broadcastd.client.subscriber import Tracker
from broadcastd.errors import ConfigError
from broadcastd.settings import (
    ENVELOPE_OVERHEAD,
    Settings,
    effective,
    iter_fields,
    load_settings,
)

if TYPE_CHECKING:
    from broadcastd.client import Publisher, StateChanged, Subscriber

    Lines = Iterator[dict[str, Any]]
    """What a control command prints: JSON objects, one line each."""

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _flag(dotted: str) -> str:
    return "--" + dotted.replace(".", "-").replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    group = parser.add_argument_group("settings (override BROADCASTD_* and the file)")
    for dotted, info in iter_fields():
        group.add_argument(
            _flag(dotted),
            dest=f"setting:{dotted}",
            metavar="VALUE",
            help=info.description,
            default=argparse.SUPPRESS,
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("setting:"):
            dotted = key.removeprefix("setting:")
            overrides[dotted] = _parse_flag_value(dotted, value)
    return overrides


def _parse_flag_value(dotted: str, value: str) -> Any:
    """Lists are given comma-separated, lists of tables (``namespaces``,
    ``control.tokens``) as the JSON their environment variables take; ``none``
    unsets an optional setting."""
    if value.lower() in ("none", "null"):
        return None
    if dotted == "ws.allowed_origins":
        return [v for v in value.split(",") if v]
    if dotted in _JSON_FLAGS:
        try:
            return json.loads(value)
        except ValueError:
            raise ConfigError(f"{_flag(dotted)}: not valid JSON (a list of tables)") from None
    return value


def _holds_tables(annotation: Any) -> bool:
    """Whether a setting's type holds models (tables), at any depth."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_tables(arg) for arg in get_args(annotation))


_JSON_FLAGS = frozenset(d for d, info in iter_fields() if _holds_tables(info.annotation))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), _overrides(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broadcastd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"broadcastd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    _add_settings_flags(serve)

    check = commands.add_parser("check-config", help="validate and print the configuration")
    _add_settings_flags(check)

    publish = commands.add_parser("publish", help="publish one message")
    publish.add_argument("channel")
    publish.add_argument(
        "data",
        nargs="?",
        default="-",
        help="the payload; - (the default) reads standard input, less one trailing newline",
    )
    publish.add_argument(
        "--content-type", help="default: application/json when DATA is valid JSON, else text/plain"
    )
    _add_client_flags(publish, control=True)

    subscribe = commands.add_parser(
        "subscribe", help="print the messages of channels, one per line"
    )
    subscribe.add_argument("channels", nargs="+", metavar="CHANNEL")
    subscribe.add_argument("--raw", action="store_true", help="print payloads only (raw mode)")
    subscribe.add_argument(
        "--max-backoff",
        type=float,
        default=30.0,
        help="longest wait between reconnection attempts (seconds)",
    )
    subscribe.add_argument(
        "--once", action="store_true", help="exit when the connection ends instead of reconnecting"
    )
    subscribe.add_argument(
        "--max-size",
        type=_at_least_one(" of bytes"),
        metavar="BYTES",
        help="largest message accepted; a larger one ends the command (close 1009). Default: "
        "1 MiB, or the configuration's control.max_payload_bytes + 256 if that is larger",
    )
    who = subscribe.add_mutually_exclusive_group()
    who.add_argument("--token", help="subscriber token (JWT), sent as Authorization: Bearer")
    who.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the subscriber token from PATH at each connection, so that a token "
        "renewed there is picked up when the old one expires (close 4003)",
    )
    _add_client_flags(subscribe, control=False)

    presence = commands.add_parser(
        "presence", help="print who subscribes to a channel, one JSON line per connection"
    )
    presence.add_argument("channel")
    presence.add_argument(
        "--stats", action="store_true", help="print the counts of clients and users instead"
    )
    presence.add_argument(
        "--limit",
        type=_at_least_one(""),
        metavar="N",
        help="print at most N entries (default: all)",
    )
    _add_client_flags(presence, control=True)

    connections = commands.add_parser(
        "connections", help="print the open connections of every node, one JSON line each"
    )
    connections.add_argument("--user", help="only this user's connections (the token's sub)")
    connections.add_argument("--channel", help="only the connections subscribed to CHANNEL")
    _add_client_flags(connections, control=True)

    disconnect = commands.add_parser(
        "disconnect", help="close a user's connections, or one connection, on every node"
    )
    whom = disconnect.add_mutually_exclusive_group(required=True)
    whom.add_argument("--user", help="every connection of this user (the token's sub)")
    whom.add_argument("--client", help="the connection with this client id")
    disconnect.add_argument(
        "--code", type=int, help="WebSocket close code, 4000 to 4999 (default: 4010)"
    )
    disconnect.add_argument("--reason", help="close reason, at most 123 bytes")
    _add_client_flags(disconnect, control=True)

    info = commands.add_parser("info", help="print each node's version, uptime and counts")
    _add_client_flags(info, control=True)
    return parser


def _at_least_one(what: str) -> Callable[[str], int]:
    """An argument type: a whole number of ``what``, at least 1."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"a whole number{what}, at least 1: {text!r}")
        return value

    return parse


def _add_client_flags(parser: argparse.ArgumentParser, *, control: bool) -> None:
    """The flags that find the daemon; ``control``: its control API (a token, a
    Unix socket), else its WebSocket port."""
    parser.add_argument("--config", metavar="PATH", help="TOML file to find the daemon in")
    parser.add_argument("--url", help="daemon URL (default: from the configuration)")
    if control:
        parser.add_argument("--token", help="bearer token (default: control.token)")
        parser.add_argument(
            "--unix", metavar="PATH", help="reach the control API over this Unix socket"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(_settings(args))
        if args.command == "check-config":
            print(json.dumps(effective(_settings(args)), indent=2))
            return 0
        settings = load_settings(args.config)
        if args.command == "subscribe":
            return subscribe(settings, args)
        return _control(settings, args, _CONTROL_COMMANDS[args.command])
    except ConfigError as exc:
        print(f"broadcastd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Whoever read stdout has gone (`broadcastd subscribe news | head -1`): end
        # quietly, with the status of a program that SIGPIPE ended.
        return _stdout_gone()


def _stdout_gone() -> int:
    """Point stdout at /dev/null, so that no later write (the interpreter's last
    flush) fails again, and return SIGPIPE's status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def serve(settings: Settings) -> int:
    """Run the daemon; 1 (after its one ``daemon.start_failed`` line) when it
    cannot start, such as when a port is taken."""
    log.configure(settings.log.level, settings.log.format, settings.log.buffer_bytes)
    from broadcastd.app import Daemon  # after logging is configured

    _tune_gc()
    _raise_fd_limit()

    async def run() -> int:
        daemon = Daemon(settings)
        try:
            return await daemon.run()
        except Exception:
            if daemon.started.is_set():
                raise
            return EXIT_FAILURE

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(run())
    finally:
        log.flush()


def _tune_gc() -> None:
    """Collect young garbage every 10,000 allocations instead of every 700.

    A closed connection is freed by reference counting alone (it leaves no
    reference cycle: see ``Connection._release`` and ``HttpProtocol.connection_lost``),
    so the collector has next to nothing to free, and runs only to find that out:
    a busy daemon's heap is large (every live connection's objects), and each
    collection walks much of it. At the default threshold a storm of 10,000
    handshakes (scenario S5) costs 3 to 8 % more server CPU than with this one.
    Much higher thresholds would make each collection a latency spike, so this
    stays moderate. What was built at start-up is frozen out of the collector's
    sight altogether.
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


def _raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard limit.

    Every subscriber is a file descriptor. Soft limits stay low (1024) only for
    programs that use select(); the event loop uses epoll, so the daemon takes
    what the hard limit allows, as Go programs do at start. Sizing still comes
    from the hard limit (systemd's LimitNOFILE, ``ulimit -Hn``, docker --ulimit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


# publish, and the server API's commands


def _control(settings: Settings, args: argparse.Namespace, lines: Callable[..., Lines]) -> int:
    """Run a command of the control API: ``lines(publisher, args)`` gives what to
    print, one JSON line each, as it comes (a long listing is printed page by
    page). A refusal is the daemon's status and JSON error on stderr, status 1;
    so is a daemon that cannot be reached."""
    from broadcastd.client import BroadcastdError, NetworkError, Publisher

    token = args.token or (
        settings.control.token.get_secret_value() if settings.control.token else None
    )
    unix = args.unix or (
        str(settings.control.unix_path) if settings.control.unix_path and not args.url else None
    )
    url = args.url or f"http://{_netloc(settings.control.host, settings.control.port)}"
    try:
        with Publisher(url, token=token, unix=unix, timeout=10) as publisher:
            for line in lines(publisher, args):
                print(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
    except NetworkError as exc:
        print(f"broadcastd: cannot reach the daemon: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except BroadcastdError as exc:
        print(f"broadcastd: HTTP {exc.status}: {exc.body}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def publish(publisher: Publisher, args: argparse.Namespace) -> Lines:
    """``broadcastd publish``: one message (not retried: no idempotency key), the
    daemon's answer printed as one line."""
    data = _stdin_message() if args.data == "-" else args.data.encode()
    content_type = args.content_type or ("application/json" if _is_json(data) else "text/plain")
    published = publisher.publish(args.channel, data, content_type=content_type)
    answer: dict[str, Any] = {"channel": published.channel}
    if published.epoch is not None:
        answer["epoch"] = published.epoch
    answer |= {"offset": published.offset, "subscribers": published.subscribers}
    if published.duplicate:
        answer["duplicate"] = True
    yield answer


def presence(publisher: Publisher, args: argparse.Namespace) -> Lines:
    """``broadcastd presence CHANNEL``: every entry (or the first ``--limit``),
    page after page; ``--stats``: the counts."""
    if args.stats:
        stats = publisher.presence_stats(args.channel)
        yield {"channel": stats.channel, "clients": stats.clients, "users": stats.users}
        return
    left: int | None = args.limit
    cursor: str | None = None
    while left is None or left > 0:
        page_size = None if left is None else min(left, PAGE)
        page = publisher.presence(args.channel, cursor=cursor, limit=page_size)
        yield from page.clients
        if left is not None:
            left -= len(page.clients)
        cursor = page.next
        if cursor is None:
            return


def connections(publisher: Publisher, args: argparse.Namespace) -> Lines:
    """``broadcastd connections``: every open connection, page after page."""
    cursor: str | None = None
    while True:
        page = publisher.connections(user=args.user, channel=args.channel, cursor=cursor)
        yield from page.connections
        cursor = page.next
        if cursor is None:
            return


def disconnect(publisher: Publisher, args: argparse.Namespace) -> Lines:
    """``broadcastd disconnect``: the count of connections closed."""
    closed = publisher.disconnect(
        user=args.user, client=args.client, code=args.code, reason=args.reason
    )
    yield {"disconnected": closed}


def info(publisher: Publisher, args: argparse.Namespace) -> Lines:
    """``broadcastd info``: one line per node."""
    yield from publisher.info()


PAGE = 1000
"""Most entries asked per page with ``--limit`` (the daemon's bound on a page)."""

_CONTROL_COMMANDS: dict[str, Callable[..., Lines]] = {
    "publish": publish,
    "presence": presence,
    "connections": connections,
    "disconnect": disconnect,
    "info": info,
}


def _netloc(host: str, port: int) -> str:
    """``host:port`` for a URL, an IPv6 address in brackets."""
    host = _local(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stdin_message() -> bytes:
    """Standard input without one trailing newline: ``echo hello | broadcastd
    publish chat`` publishes "hello", as ``$(...)`` would give it."""
    data = sys.stdin.buffer.read()
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    return data


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


# subscribe


class Resume(Tracker):
    """Where the output of each channel stands, so a reconnection carries on from it.

    The positions are :class:`broadcastd.client.subscriber.Tracker`'s, the same
    that :class:`broadcastd.client.Subscriber` keeps for ``subscribe``: the next
    connection asks ``since=CHANNEL:EPOCH:OFFSET`` for every channel with a
    position and ``channel=CHANNEL`` for the others (an old daemon that sends no
    epoch). What it adds is the command's output: :meth:`frame` gives the line to
    print for a frame and the notice for stderr when the daemon could not resume a
    channel (``recovered: false``, with a reason), after which the channel carries
    on from the position the daemon gives.

    Raw mode (``--raw``) frames carry no positions, so the command always connects
    in JSON mode and prints what raw mode would have: each message's payload,
    nothing else but error replies.
    """

    def __init__(self, channels: Sequence[str], raw: bool = False) -> None:
        super().__init__(channels)
        self.raw = raw

    def frame(self, text: str) -> tuple[str | None, str | None]:
        """Note one frame; return the line to print (None: nothing) and a notice for stderr."""
        return _output(self.feed(text), self.raw)


def _output(item: Message | Event, raw: bool) -> tuple[str | None, str | None]:
    """The line ``subscribe`` prints for a message or event (None: nothing), and the
    notice it writes on stderr (None: none)."""
    if isinstance(item, Message):
        return (_raw_payload(item.frame, item.data) if raw else item.frame), None
    notice = None
    if isinstance(item, Recovered) and not item.recovered:
        notice = (
            f"broadcastd subscribe: {item.channel}: could not recover "
            f"(reason {item.reason}): messages may have been missed"
        )
    if raw and isinstance(item, Subscribed | Recovered | Missed):
        return None, notice
    return item.frame or None, notice


def _raw_payload(text: str, data: Any) -> str:
    """What raw mode sends for a message whose JSON envelope is ``text``: a string
    itself, any other value as the JSON text the publisher sent (the daemon embeds
    it verbatim after ``"data":``; re-encoded if it cannot be found)."""
    if isinstance(data, str):
        return data
    start = text.find(',"data":')
    if start != -1 and text.endswith("}"):
        verbatim = text[start + len(',"data":') : -1]
        with contextlib.suppress(ValueError):
            if json.loads(verbatim) == data:
                return verbatim
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def subscribe(settings: Settings, args: argparse.Namespace) -> int:
    """``broadcastd subscribe``: a :class:`broadcastd.client.Subscriber` printing
    each frame; a ``--token-file`` is its ``get_token``, read at each connection
    and when the daemon says the token is expiring."""
    from broadcastd.client import Subscriber

    url = args.url or f"ws://{_netloc(settings.ws.host, settings.ws.port)}/"
    token_file = args.token_file

    async def read_token() -> str | None:
        text = await asyncio.to_thread(Path(token_file).read_text)
        return text.strip() or None

    max_size = args.max_size or max(
        DEFAULT_MAX_SIZE, settings.control.max_payload_bytes + ENVELOPE_OVERHEAD
    )

    async def run() -> int:
        try:
            subscriber = Subscriber(
                url,
                token=args.token,
                get_token=read_token if token_file is not None else None,
                max_backoff=args.max_backoff,
                max_size=max_size,
            )
        except ValueError as exc:
            print(f"broadcastd: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return await _subscribe(subscriber, args.channels, args.raw, args.once)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(run())
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 128 + signal.SIGINT


async def _subscribe(subscriber: Subscriber, channels: Sequence[str], raw: bool, once: bool) -> int:
    """Print every frame, one per line, and each failed recovery on stderr; the
    subscriber reconnects and resumes by itself, unless ``once``: then the end of
    the first connection (or attempt) ends the command.

    SIGINT (Ctrl-C) or SIGTERM closes the connection normally (1000: the server
    sees a client that left, not one that failed) and exits 128 + the signal
    number, as a shell reports an interrupted command; a second signal, or one
    while not connected, exits at once. When stdout is a pipe whose reader goes
    (``| head -1``), the command notices at once, not at its next line of
    output (which may never come), and ends the same way with SIGPIPE's status,
    quietly.
    """
    from broadcastd.client import (
        ALL_EVENTS,
        ClosedByServer,
        MessageTooBig,
        RequestRefused,
        State,
        StateChanged,
    )

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    closing: list[asyncio.Task[None]] = []
    ending = 0
    """The exit status asked for by a signal or by the reader's going (0: none)."""

    def end(status: int) -> None:
        nonlocal ending
        first = not ending
        ending = status
        if first and subscriber.state is State.CONNECTED:
            closing.append(loop.create_task(subscriber.close()))  # ends the stream
        else:
            main.cancel()

    def on_signal(signum: int) -> None:
        end(128 + signum)

    def on_reader_gone() -> None:
        end(_stdout_gone())

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    unwatch = _watch_reader(loop, sys.stdout, on_reader_gone)
    try:
        async for item in subscriber.subscribe(*channels, events=ALL_EVENTS):
            if isinstance(item, StateChanged):
                if item.state is State.DISCONNECTED and not ending:
                    print(_disconnected(item), file=sys.stderr)
                    if once and item.retry_in is not None:
                        return 0
                continue
            line, notice = _output(item, raw)
            if notice is not None:
                print(notice, file=sys.stderr)
            if line is not None:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        return ending
    except (RequestRefused, ClosedByServer, MessageTooBig):  # told by the DISCONNECTED event
        return EXIT_FAILURE
    except asyncio.CancelledError:
        if ending:
            return ending
        raise
    finally:
        unwatch()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _watch_reader(
    loop: asyncio.AbstractEventLoop, output: IO[Any], on_gone: Callable[[], None]
) -> Callable[[], None]:
    """Call ``on_gone`` once the reader of the pipe that ``output`` writes to has
    gone; return what stops watching.

    A write to such a pipe fails (EPIPE), but a command with nothing to print would
    not find out until its next line. The pipe tells sooner: its write end reports
    an error (EPOLLERR, which epoll reports whatever was asked for) once no reader
    is left, so it is watched as a reader. Both asyncio's selector and uvloop call
    the callback for it; a one-off poll then confirms the error, as readiness
    alone could also mean a FIFO opened for reading and writing. uvloop makes a
    watched descriptor non-blocking; stdout is put back as it was, since the
    lines are written to it with blocking writes. Anything else than a pipe (a
    terminal, a file, a socket) is not watched: its reader's going is noticed at
    the next write, as before.
    """

    try:
        fd = output.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return _nothing
        blocking = os.get_blocking(fd)
    except (OSError, ValueError):  # no stdout, or not a file (io.UnsupportedOperation)
        return _nothing

    def check() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        loop.remove_reader(fd)
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            on_gone()

    def unwatch() -> None:
        loop.remove_reader(fd)

    try:
        loop.add_reader(fd, check)
    except (OSError, ValueError, NotImplementedError):
        return _nothing
    os.set_blocking(fd, blocking)
    return unwatch


def _nothing() -> None:
    return None


def _disconnected(event: StateChanged) -> str:
    """The stderr line for a connection that ended or an attempt that failed."""
    from broadcastd.client import BroadcastdError, MessageTooBig

    error = event.error
    if event.close_code is not None:
        told = f": {error}" if error is not None else ""
        if isinstance(error, MessageTooBig):
            told += " (see --max-size)"
        return f"broadcastd: connection closed ({event.close_code}){told}"
    if isinstance(error, BroadcastdError) and error.status is not None:
        return f"broadcastd: handshake refused: HTTP {error.status} {error.body}"
    return f"broadcastd: cannot connect: {error}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
