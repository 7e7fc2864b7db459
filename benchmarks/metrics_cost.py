"""What metrics cost on the fan-out path: ``python -m benchmarks.metrics_cost``.

The load scenarios move by more than the cost of counting from one run to the
next (the loopback write is most of a delivery), so this measures the part of
the hot path that metrics touch, in process and with no sockets: publishes of
one message to 1000 subscribers through Node, each followed by the writers'
per-pass report, with the Prometheus observer and with none. It prints CPU time
per delivery for both and the difference.
"""

from __future__ import annotations

import asyncio
import time

from broadcastd.core.envelope import Payload
from broadcastd.core.observer import NullObserver, Observer
from broadcastd.core.outbox import Outbox
from broadcastd.node import Node
from broadcastd.settings import load_settings
from broadcastd.transport.metrics import Metrics

SUBSCRIBERS = 1000
PUBLISHES = 3000
ROUNDS = 7


def _joined(*_: object) -> None:
    """The memory engine joins at once."""


def _failed(error: Exception) -> None:
    raise error


def _cpu_per_delivery(observer: Observer, subscribers: int) -> float:
    node = Node(load_settings(), observer=observer)
    asyncio.run(node.start())
    outboxes = [Outbox(100_000, 1 << 30) for _ in range(subscribers)]
    for outbox in outboxes:
        node.join(outbox, "bench", False, None, _joined, _failed)
    payload = Payload.from_value({"t": 1, "pad": "x" * 40})
    publishes = PUBLISHES * SUBSCRIBERS // subscribers
    started = time.process_time()
    for n in range(publishes):
        node.publish("bench", payload, "channel")
        # What one pass of the writers reports (the writes themselves are not metrics).
        frames = 0
        for outbox in outboxes:
            frames += len(outbox.take())
        observer.written(frames, frames * 64, subscribers, 0.001 * (n % 7))
    return (time.process_time() - started) / (publishes * subscribers)


def main() -> None:
    for subscribers in (SUBSCRIBERS, 1):
        without = min(_cpu_per_delivery(NullObserver(), subscribers) for _ in range(ROUNDS))
        with_metrics = min(_cpu_per_delivery(Metrics(), subscribers) for _ in range(ROUNDS))
        print(f"publish + fan-out + pass report, {subscribers} subscriber(s), best of {ROUNDS}:")
        print(f"  without metrics: {without * 1e9:7.1f} ns CPU per delivery")
        print(f"  with metrics:    {with_metrics * 1e9:7.1f} ns CPU per delivery")
        print(f"  metrics cost:    {(with_metrics / without - 1) * 100:+.2f} %")


if __name__ == "__main__":
    main()
