"""Placeholder until the full notifier lands (owned by the deploy-kit work)."""

from __future__ import annotations

import os
from collections.abc import Mapping


class SystemdNotifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    def ready(self) -> bool:
        return False

    def stopping(self) -> bool:
        return False
