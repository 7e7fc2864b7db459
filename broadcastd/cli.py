"""``broadcastd serve | check-config | publish | subscribe``.

Every setting is also a flag of ``serve`` and ``check-config``: ``ws.port``
becomes ``--ws-port``, ``drain_timeout`` becomes ``--drain-timeout``. Flags
override the environment, which overrides the TOML file. ``publish`` and
``subscribe`` read the same configuration to find the daemon, so on a host
where the daemon runs they need no flags at all.

Exit status: 0 success, 1 a runtime failure (the daemon refused or could not
be reached, or could not start), 2 a usage or configuration error; 128 + the
signal number when ``subscribe`` is ended by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import random
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from broadcastd import __version__, log
from broadcastd.errors import ConfigError
from broadcastd.settings import Settings, effective, iter_fields, load_settings

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
    """Lists are given comma-separated; ``none`` unsets an optional setting."""
    if value.lower() in ("none", "null"):
        return None
    if dotted == "ws.allowed_origins":
        return [v for v in value.split(",") if v]
    return value


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
    _add_client_flags(publish)

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
    who = subscribe.add_mutually_exclusive_group()
    who.add_argument("--token", help="subscriber token (JWT), sent as Authorization: Bearer")
    who.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the subscriber token from PATH at each connection, so that a token "
        "renewed there is picked up when the old one expires (close 4003)",
    )
    _add_client_flags(subscribe)
    return parser


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML file to find the daemon in")
    parser.add_argument("--url", help="daemon URL (default: from the configuration)")
    if parser.prog.endswith("publish"):
        parser.add_argument("--token", help="bearer token (default: control.token)")
        parser.add_argument("--unix", metavar="PATH", help="publish over this Unix socket")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(_settings(args))
        if args.command == "check-config":
            print(json.dumps(effective(_settings(args)), indent=2))
            return 0
        settings = load_settings(args.config)
        if args.command == "publish":
            return publish(settings, args)
        return subscribe(settings, args)
    except ConfigError as exc:
        print(f"broadcastd: {exc}", file=sys.stderr)
        return EXIT_USAGE


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

    Each connection holds a few reference cycles (websockets' parser generator
    refers to its protocol), so the heap of a busy daemon is large and every
    collection walks much of it: at the default threshold a storm of 10,000
    handshakes spends a tenth of its time collecting. Much higher thresholds make
    each collection a latency spike, so this stays moderate. What was built at
    start-up is frozen out of the collector's sight altogether.
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


# publish


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self.sock = sock


def publish(settings: Settings, args: argparse.Namespace) -> int:
    data = _stdin_message() if args.data == "-" else args.data.encode()
    content_type = args.content_type or ("application/json" if _is_json(data) else "text/plain")
    token = args.token or (
        settings.control.token.get_secret_value() if settings.control.token else None
    )
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    unix = args.unix or (
        str(settings.control.unix_path) if settings.control.unix_path and not args.url else None
    )
    conn: http.client.HTTPConnection
    if unix:
        conn = _UnixConnection(unix)
    else:
        url = urlsplit(
            args.url or f"http://{_local(settings.control.host)}:{settings.control.port}"
        )
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=10)
    try:
        # ":" and "@" belong to channel names and are legal in a path: sent as they
        # are (the daemon takes names literally). What a name cannot hold is
        # percent-encoded, so the daemon answers bad_channel instead of bad_request.
        conn.request("POST", f"/publish/{quote(args.channel, safe=':@')}", data, headers)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    except OSError as exc:
        print(f"broadcastd: cannot reach the daemon: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        conn.close()
    if response.status != 200:
        print(f"broadcastd: HTTP {response.status}: {body}", file=sys.stderr)
        return EXIT_FAILURE
    print(body)
    return 0


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

GIVE_UP_CODES = frozenset((1003, 1007, 1008, 1009))
"""Close codes that mean the client is at fault: reconnecting would fail again."""
TOKEN_CODES = frozenset((4001, 4002, 4003))
"""Closes for want of a (valid, current) token: worth retrying only with a token
file that may have been renewed meanwhile."""


class Backoff:
    """Exponential backoff with full jitter between reconnection attempts.

    The n-th consecutive failure waits a uniformly random time in
    [0, min(cap, base * 2**n)], so many clients dropped at once do not return
    at once. The count starts again only after a connection has stayed up for
    ``stable_after`` seconds: a server that accepts and then drops clients
    at once must not be hammered at the base rate.
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        stable_after: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._opened_at: float | None = None

    def opened(self, now: float) -> None:
        self._opened_at = now

    def next_delay(self, now: float) -> float:
        """Seconds to wait before the next attempt; call when a connection ends or fails."""
        if self._opened_at is not None and now - self._opened_at >= self.stable_after:
            self.failures = 0
        self._opened_at = None
        delay = self._rng.uniform(0, min(self.cap, self.base * 2**self.failures))
        self.failures += 1
        return delay


class Position(NamedTuple):
    epoch: str
    offset: int


class Resume:
    """Where the output of each channel stands, so a reconnection carries on from it.

    A channel's position is (epoch, offset) of the last message printed: the epoch
    comes from the ``subscribed`` reply (message frames do not repeat it), the
    offset from each message. The next connection asks ``since=CHANNEL:EPOCH:OFFSET``
    for every channel with a position and ``channel=CHANNEL`` for the others (an
    old daemon that sends no epoch). The daemon then replays what was missed or
    says why it cannot (``recovered: false``, with a reason): that is told on
    stderr, one line, and the channel carries on from the position it gives.

    Raw mode (``--raw``) frames carry no positions, so the client always connects
    in JSON mode and prints what raw mode would have: each message's payload,
    nothing else but error replies.
    """

    def __init__(self, channels: Sequence[str], raw: bool = False) -> None:
        self.channels = list(dict.fromkeys(channels))
        self.raw = raw
        self.positions: dict[str, Position] = {}

    def query(self) -> list[tuple[str, str]]:
        """The query string parameters of the next connection."""
        query: list[tuple[str, str]] = []
        for channel in self.channels:
            at = self.positions.get(channel)
            if at is None:
                query.append(("channel", channel))
            else:
                query.append(("since", f"{channel}:{at.epoch}:{at.offset}"))
        return query

    def frame(self, text: str) -> tuple[str | None, str | None]:
        """Note one frame; return the line to print (None: nothing) and a notice for stderr."""
        try:
            doc = json.loads(text)
        except ValueError:
            return text, None
        if not isinstance(doc, dict):
            return text, None
        kind, channel = doc.get("type"), doc.get("channel")
        if kind is None and isinstance(channel, str) and "data" in doc:
            offset = doc.get("offset")
            at = self.positions.get(channel)
            if at is not None and isinstance(offset, int):
                self.positions[channel] = Position(at.epoch, offset)
            return (_raw_payload(text, doc["data"]) if self.raw else text), None
        notice = None
        if kind == "subscribed" and isinstance(channel, str):
            notice = self._subscribed(channel, doc)
        if self.raw and kind in ("subscribed", "missed"):
            return None, notice
        return text, notice

    def _subscribed(self, channel: str, reply: dict[str, Any]) -> str | None:
        epoch, offset, recovered = reply.get("epoch"), reply.get("offset"), reply.get("recovered")
        if not isinstance(epoch, str) or not isinstance(offset, int):
            self.positions.pop(channel, None)
            return None
        at = self.positions.get(channel)
        if recovered is True and at is not None and at.epoch == epoch:
            return None  # the replay that follows brings the offset up to date
        self.positions[channel] = Position(epoch, offset)
        if recovered is False:
            return (
                f"broadcastd subscribe: {channel}: could not recover "
                f"(reason {reply.get('reason')}): messages may have been missed"
            )
        return None


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
    base = args.url or f"ws://{_local(settings.ws.host)}:{settings.ws.port}/"
    resume = Resume(args.channels, raw=args.raw)
    token_file = args.token_file

    def token() -> str | None:
        if token_file is not None:
            return Path(token_file).read_text().strip() or None
        value: str | None = args.token
        return value

    try:
        return asyncio.run(
            _subscribe(
                base.rstrip("/") + "/?",
                resume,
                Backoff(cap=args.max_backoff),
                args.once,
                token,
                renewable=token_file is not None,
            )
        )
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 128 + signal.SIGINT


async def _subscribe(
    base: str,
    resume: Resume,
    backoff: Backoff,
    once: bool,
    token: Callable[[], str | None] = lambda: None,
    *,
    renewable: bool = False,
) -> int:
    """Print every frame, one per line; reconnect after ``backoff`` unless ``once``,
    from where each channel's output stands (``resume``), with the ``token`` of the
    moment (a ``renewable`` one is read again at each connection, so an expired
    token, close 4003, is replaced by a renewed one; a static one that expired or
    was refused ends the command).

    SIGINT (Ctrl-C) or SIGTERM closes the connection normally (1000: the server
    sees a client that left, not one that failed) and exits 128 + the signal
    number, as a shell reports an interrupted command; a second signal, or one
    while not connected, exits at once.
    """
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    current: ClientConnection | None = None
    closing: list[asyncio.Task[None]] = []
    signalled = 0

    def on_signal(signum: int) -> None:
        nonlocal signalled
        first = not signalled
        signalled = signum
        if first and current is not None:
            closing.append(loop.create_task(current.close()))  # ends the loop below
        else:
            main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        while True:
            try:
                url = base + urlencode(resume.query())
                bearer = token()
                headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
                async with connect(
                    url, compression=None, max_size=None, additional_headers=headers
                ) as ws:
                    current = ws
                    backoff.opened(time.monotonic())
                    async for message in ws:
                        text = message if isinstance(message, str) else message.decode()
                        line, notice = resume.frame(text)
                        if notice is not None:
                            print(notice, file=sys.stderr)
                        if line is not None:
                            sys.stdout.write(line + "\n")
                            sys.stdout.flush()
                if not signalled:
                    print(f"broadcastd: connection closed ({ws.close_code})", file=sys.stderr)
            except InvalidStatus as exc:
                status = exc.response.status_code
                print(
                    f"broadcastd: handshake refused: HTTP {status} "
                    f"{exc.response.body.decode('utf-8', 'replace')}",
                    file=sys.stderr,
                )
                if 400 <= status < 500:
                    return EXIT_FAILURE
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                print(f"broadcastd: connection closed ({code})", file=sys.stderr)
                if code in GIVE_UP_CODES or (code in TOKEN_CODES and not renewable):
                    return EXIT_FAILURE
            except OSError as exc:
                print(f"broadcastd: cannot connect: {exc}", file=sys.stderr)
            finally:
                current = None
            if signalled:
                return 128 + signalled
            if once:
                return 0
            await asyncio.sleep(backoff.next_delay(time.monotonic()))
    except asyncio.CancelledError:
        if signalled:
            return 128 + signalled
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
