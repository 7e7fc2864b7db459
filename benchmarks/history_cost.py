"""What history adds to a single publish, in process (no sockets).

10,000 channels with one subscriber each; the history budget is filled first,
then 200,000 single publishes are timed, with the garbage collector on and off.
Run it with history on and off and compare:

    .venv/bin/python -m benchmarks.history_cost 100
    .venv/bin/python -m benchmarks.history_cost 0
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

from broadcastd.core.envelope import Payload
from broadcastd.core.outbox import Outbox
from broadcastd.node import Node
from broadcastd.settings import load_settings

CHANNELS = 10_000
WARM_UP = 300_000
TIMED = 200_000


def _publish(node: Node, outboxes: list[Outbox], count: int, payload: Payload) -> None:
    for i in range(count):
        node.publish(f"c{i % CHANNELS}", payload, "channel")
        if i % CHANNELS == 0:
            for outbox in outboxes:
                outbox.take()


def _joined(*_: object) -> None:
    """The memory engine joins at once."""


def _failed(error: Exception) -> None:
    raise error


async def main(size: int) -> None:
    node = Node(load_settings(overrides={"log.level": "warning", "history.size": size}))
    await node.start()
    outboxes = [Outbox(100_000, 10**9) for _ in range(CHANNELS)]
    for i, outbox in enumerate(outboxes):
        node.join(outbox, f"c{i}", False, None, _joined, _failed)
    payload = Payload.from_json_body(b'{"x":"' + b"y" * 50 + b'"}')
    _publish(node, outboxes, WARM_UP, payload)
    for collector in ("on", "off"):
        if collector == "off":
            gc.disable()
        started = time.perf_counter()
        _publish(node, outboxes, TIMED, payload)
        per_publish = (time.perf_counter() - started) / TIMED * 1e6
        gc.enable()
        kept = node.broker.stats().entries
        print(f"history.size={size} gc {collector}: {per_publish:.2f} us/publish, {kept} kept")
    await node.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
