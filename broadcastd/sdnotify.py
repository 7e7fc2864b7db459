"""Tell systemd about the daemon's state over ``NOTIFY_SOCKET`` (``sd_notify(3)``).

Why not libsystemd or a package: the protocol is one datagram of ``KEY=VALUE``
lines sent to the ``AF_UNIX`` socket named by ``NOTIFY_SOCKET``; a dozen lines of
standard library do it, with nothing to install in a container image.

The unit (``systemd/broadcastd.service``) uses ``Type=notify``, so systemd
considers the service started only when ``READY=1`` arrives (after every
listener accepts connections), and ``WatchdogSec=`` restarts the daemon if
``WATCHDOG=1`` stops arriving. Outside systemd (a terminal, a container)
``NOTIFY_SOCKET`` is unset and every method is a no-op returning False.

Notification is best effort by design: a daemon that cannot reach systemd must
keep serving, so no method raises on a send failure and none logs (the caller
has the context to decide whether a False is worth a log line).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    """Sends state notifications to the service manager, or nothing when there is none.

    ``address`` is ``NOTIFY_SOCKET`` as systemd sets it: an absolute path, or
    ``@name`` for a socket in the abstract namespace. Anything else (unset,
    empty, relative, ``vsock:``) makes the notifier a no-op.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: int | None = None,
    ) -> None:
        self.address = address
        self._target = _target(address)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        """The notifier systemd asked for through ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``.

        The watchdog is armed only when ``WATCHDOG_PID`` is unset or names this
        process: systemd sets it so a child that inherited the environment does
        not mistake the parent's watchdog for its own.
        """
        watchdog_usec: int | None = None
        raw_usec = environ.get("WATCHDOG_USEC", "")
        raw_pid = environ.get("WATCHDOG_PID", "")
        if (
            raw_usec.isascii()
            and raw_usec.isdigit()
            and (not raw_pid or raw_pid == str(os.getpid()))
        ):
            watchdog_usec = int(raw_usec)
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self._target is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls, or None when no watchdog is armed.

        Half of ``WatchdogSec=``, as ``sd_watchdog_enabled(3)`` recommends, so
        that one late ping does not get the daemon killed.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        """Start-up is complete: every listener accepts connections (``READY=1``)."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """The drain has begun (``STOPPING=1``), so systemd reports "deactivating"."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line free-form status shown by ``systemctl status`` (``STATUS=``).

        Line breaks are replaced by spaces: each line of a notification is a
        separate assignment, so text with a newline could otherwise send
        ``READY=1`` or ``MAINPID=`` on the daemon's behalf.
        """
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """I am alive (``WATCHDOG=1``); call every ``watchdog_interval`` seconds."""
        return self.notify("WATCHDOG=1")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent.

        The socket is non-blocking: if systemd's queue is full the notification
        is dropped rather than stalling the event loop that calls this. A new
        socket per call keeps the notifier free of state to close or to share
        across ``fork()``; notifications are rare (start, stop, a ping every
        few seconds).
        """
        if self._target is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._target)
        except OSError:
            return False
        return True

    def __repr__(self) -> str:
        return (
            f"SystemdNotifier(address={self.address!r}, "
            f"watchdog_interval={self.watchdog_interval!r})"
        )


def _target(address: str | None) -> str | None:
    """The ``sendto`` address for ``NOTIFY_SOCKET``, or None when it is unusable."""
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]  # Linux abstract namespace
    if address.startswith("/"):
        return address
    return None
