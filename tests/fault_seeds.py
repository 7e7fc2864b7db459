"""Seeds of tests/test_fault_injection.py.

A seed fixes every random choice of a run: which channels each witness follows
and when it joins, the publish schedule, and each misbehaving client's actions.
It does not fix the interleaving (the daemon and the clients run concurrently),
so a seed reproduces a failure with high probability, not with certainty.

Run one seed:    FAULT_SEED=1234 .venv/bin/pytest tests/test_fault_injection.py
Run all kept:    FAULT_SEED=kept .venv/bin/pytest tests/test_fault_injection.py
A fresh seed:    FAULT_SEED=random (the seed is in the test id and in any failure)
One action only: FAULT_ACTIONS=ping_flood,reset (names in tests/hostile.py ACTIONS)

Every seed that ever failed stays in KEPT_SEEDS with what it found (and the
commit it was found on).
"""

from __future__ import annotations

CI_SEEDS = [1, 2, 3]
"""Run by default (CI): each found the defects below on 8526e5b."""

KEPT_SEEDS: dict[int, str] = {
    1: (
        "8526e5b: a FIN read in the same loop turn as a publish: the writer pass "
        "(WsServer._flush) wrote to a connection after write_eof (RuntimeError), the "
        "exception escaped the pass and every connection after it stayed marked dirty: "
        "witnesses silenced for good, drain aborted them. Also: a handshake request with "
        "garbage behind it in the same write made the parser shut the write side, then "
        "the 101 was written anyway ('Fatal error on transport', RuntimeError in "
        "data_received > _on_request > _send_protocol_data)."
    ),
    2: "8526e5b: the same two defects (6 silenced witnesses, 11 tracebacks).",
    3: "8526e5b: the same two defects (6 silenced witnesses, 6 tracebacks).",
}
"""Seeds that found a defect, and what it was."""
