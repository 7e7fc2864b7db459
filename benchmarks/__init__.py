"""broadcastd's benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

``run_quick`` is the smoke entry point for the test suite: tiny numbers, all
scenarios, one server, no CPU pinning, nothing written to disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

__all__ = ["run_quick"]


def run_quick(
    server: str = "naive", scenarios: Sequence[str] | None = None, *, tls: bool = False
) -> dict[str, Any]:
    """Run every scenario (or ``scenarios``) at smoke-test size against ``server``;
    return the results.

    Synchronous: it runs its own event loop, so call it from plain (not async) tests.
    The returned dict has ``servers[server]["scenarios"][name]`` with ``metrics``
    and ``details``, or ``error`` for a scenario that failed; with ``tls``, also
    ``servers[server + "+tls"]``, the same scenarios over TLS.
    """
    from benchmarks.runner import run
    from benchmarks.scenarios import QUICK, SCENARIOS

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_quick() runs its own event loop; call it outside async code")
    import uvloop

    names = list(SCENARIOS if scenarios is None else scenarios)
    return uvloop.run(run([server], names, QUICK, pin=False, progress=lambda _: None, tls=tls))
