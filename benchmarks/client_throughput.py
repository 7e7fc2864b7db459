"""How many messages per second one ``broadcastd.client.Subscriber`` keeps up with.

    .venv/bin/python -m benchmarks.client_throughput [--messages 1000000] [--loop asyncio]

Starts ``broadcastd serve`` on free loopback ports (on core 0 with ``taskset``
when there are two cores or more; this process, the subscriber and the
publisher, moves to core 1), then measures one Subscriber on one channel fed
64-byte messages by ``POST /batch`` requests of ``--batch`` messages (prebuilt
bodies over four keep-alive connections, answers not decoded: the publisher's
share of this process is small). Two phases:

- live: the publisher streams flat out, holding at most ``--window`` messages
  published but not yet received, so the subscriber sets the pace as long as it
  is the slower side (the daemon's outbox is made large enough for the window:
  no slow-consumer policy steps in). The rate printed each second, and the
  whole run's, is what the subscriber received while keeping up; the CPU share
  of the daemon says which side was the limit. On a small machine the daemon's
  ingest is (a daemon core at 100%): the figure is then a floor for the client.
- backlog: ``--messages`` are published first, while the subscriber does not
  read (they wait in the daemon's outbox and the socket buffers), then it reads
  them all. Writing out a queue costs the daemon little, so this is the
  subscriber's own ceiling: what one connection keeps up with.

Every message's offset is checked to follow the one before (nothing lost,
nothing doubled). Target: 50,000 messages per second or more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx

from benchmarks.procstat import cpu_seconds, self_cpu_seconds
from broadcastd.client import Message, Subscribed, Subscriber

REPO = Path(__file__).resolve().parent.parent
PAYLOAD_BYTES = 64
READY_TIMEOUT = 30.0
TARGET = 50_000
PUBLISHERS = 4


def _payload(size: int = PAYLOAD_BYTES) -> bytes:
    head = b'{"pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _batch_body(channel: str, count: int) -> bytes:
    item = b'{"channel":"%s","data":%s}' % (channel.encode(), _payload())
    return b"[" + b",".join([item] * count) + b"]"


class Daemon:
    """``broadcastd serve`` as a subprocess, its ports read from its ``daemon.ready``
    log line (it binds port 0 itself: no port can be taken in between)."""

    def __init__(self, outbox_messages: int, pin_core: int | None) -> None:
        self.outbox_messages = outbox_messages
        self.pin_core = pin_core
        self.proc: asyncio.subprocess.Process | None = None
        self.ws_url = self.control_url = ""
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        argv = [
            *(sys.executable, "-m", "broadcastd", "serve"),
            *("--ws-host", "127.0.0.1", "--ws-port", "0"),
            *("--control-port", "0", "--metrics-port", "0"),
            *("--log-format", "json", "--log-level", "info"),
            *("--ws-outbox-messages", str(self.outbox_messages)),
            *("--ws-outbox-bytes", str(self.outbox_messages * 256)),
        ]
        if self.pin_core is not None:
            argv = ["taskset", "-c", str(self.pin_core), *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("broadcastd exited before it was ready")
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "daemon.ready":
                        self.ws_url = f"ws://{event['ws']}"
                        self.control_url = f"http://{event['control']}"
                        break
        self._drain = asyncio.create_task(self._read_rest())

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    async def _read_rest(self) -> None:
        """Keep reading its log, so that a full pipe never stops it."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._drain is not None:
            await self._drain


async def _publish(http: httpx.AsyncClient, body: bytes) -> None:
    response = await http.post("/batch", content=body, headers={"Content-Type": "application/json"})
    response.raise_for_status()


async def live(
    daemon: Daemon, http: httpx.AsyncClient, messages: int, batch: int, window: int
) -> float:
    """Publish and receive at once; the rate received."""
    body = _batch_body("live", batch)
    received = published = 0
    room = asyncio.Event()
    subscribed = asyncio.Event()
    done = asyncio.Event()
    async with Subscriber(daemon.ws_url) as subscriber:
        stream = subscriber.subscribe("live", events={Subscribed})

        async def consume() -> None:
            nonlocal received
            expected = 1
            async for item in stream:
                if not isinstance(item, Message):
                    subscribed.set()  # the daemon holds the subscription: publish
                    continue
                if item.offset != expected:
                    raise AssertionError(f"offset {item.offset}, expected {expected}")
                expected += 1
                received += 1
                if published - received <= window // 2:
                    room.set()
                if received >= messages:
                    done.set()
                    return

        async def produce() -> None:
            nonlocal published
            while published < messages:
                if published - received > window - batch:
                    room.clear()
                    await room.wait()
                    continue
                published += batch  # counted when sent: the others see it at once
                await _publish(http, body)

        async def report() -> None:
            last = 0
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)
                if not done.is_set():
                    print(f"  {received - last:>9,} messages/s", flush=True)
                    last = received

        consumer = asyncio.create_task(consume())
        await subscribed.wait()
        started, daemon_cpu, own_cpu = time.perf_counter(), daemon.cpu(), self_cpu_seconds()
        reporter = asyncio.create_task(report())
        # Several requests in flight (one connection each), so the daemon is never
        # idle while an answer travels back.
        await asyncio.gather(consumer, *(produce() for _ in range(PUBLISHERS)))
        elapsed = time.perf_counter() - started
        await reporter
    daemon_share = (daemon.cpu() - daemon_cpu) / elapsed
    own_share = (self_cpu_seconds() - own_cpu) / elapsed
    print(
        f"  CPU: daemon {daemon_share:.0%} of a core, "
        f"subscriber and publisher {own_share:.0%} of a core"
    )
    return received / elapsed


async def backlog(daemon: Daemon, http: httpx.AsyncClient, messages: int, batch: int) -> float:
    """Publish everything, then read it all; the rate read."""
    body = _batch_body("backlog", batch)
    async with Subscriber(daemon.ws_url) as subscriber:
        stream = subscriber.subscribe("backlog", events={Subscribed})
        assert isinstance(await anext(stream), Subscribed)
        for _ in range(messages // batch):
            await _publish(http, body)
        started, own_cpu = time.perf_counter(), self_cpu_seconds()
        expected = 1
        async for item in stream:
            assert isinstance(item, Message)
            if item.offset != expected:
                raise AssertionError(f"offset {item.offset}, expected {expected}")
            if expected == messages:
                break
            expected += 1
        elapsed = time.perf_counter() - started
    per_message = (self_cpu_seconds() - own_cpu) / messages
    print(f"  subscriber CPU {per_message * 1e6:.1f} µs per message")
    return messages / elapsed


async def run(messages: int, batch: int, window: int) -> tuple[float, float]:
    # The daemon on core 0, this process on core 1: neither takes the other's CPU.
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    daemon = Daemon(outbox_messages=max(messages, window) * 2, pin_core=0 if pin else None)
    if pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    await daemon.start()
    try:
        async with httpx.AsyncClient(
            base_url=daemon.control_url, timeout=60, trust_env=False
        ) as http:
            print(f"live: publishing and receiving {messages:,} messages")
            live_rate = await live(daemon, http, messages, batch, window)
            print(f"  received {live_rate:,.0f} messages/s")
            print(f"backlog: {messages:,} messages queued, then read")
            backlog_rate = await backlog(daemon, http, messages, batch)
            print(f"  read {backlog_rate:,.0f} messages/s")
    finally:
        await daemon.stop()
    return live_rate, backlog_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="messages per /batch request")
    parser.add_argument(
        "--window", type=int, default=50_000, help="most messages published and not yet received"
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    messages = max(args.batch, args.messages - args.messages % args.batch)
    print(
        f"one Subscriber, messages of {PAYLOAD_BYTES} bytes, /batch of {args.batch}, "
        f"window {args.window:,}, {args.loop} loop"
    )
    coroutine = run(messages, args.batch, args.window)
    if args.loop == "uvloop":
        import uvloop

        live_rate, backlog_rate = uvloop.run(coroutine)
    else:
        live_rate, backlog_rate = asyncio.run(coroutine)
    verdict = "meets" if backlog_rate >= TARGET else "below"
    print(
        f"client throughput: keeps up with {backlog_rate:,.0f} messages/s ({verdict} the "
        f"{TARGET:,}/s target); {live_rate:,.0f}/s received live from a publisher"
    )


if __name__ == "__main__":
    main()
