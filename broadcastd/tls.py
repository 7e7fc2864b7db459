"""TLS for the subscriber and control ports: a server context per port, read
from its certificate and key files, and read again on SIGHUP.

Why one context per port that is reloaded in place, rather than a new one: the
listening socket keeps the context it was created with, and connections take
their certificate from it at their handshake. Loading the new files into that
same context gives every later handshake the new certificate, while the open
connections keep the session they negotiated: nothing is dropped. The files are
first read into a scratch context, so that a bad file (unreadable, not PEM, a
key that does not match) is refused with a log line and the old certificate
stays in use.

TLS 1.2 is the oldest version offered; the cipher suites are OpenSSL's
defaults for a server (Python's ``ssl.create_default_context`` policy).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from broadcastd import log
from broadcastd.errors import ConfigError

_log = log.get("broadcastd.tls")


def _context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context holding the files' certificate chain and key; raises
    ssl.SSLError or OSError for a bad or unreadable file."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_file, key_file)
    return context


class ServerTls:
    """One port's TLS: its context, and reloading its files into it."""

    __slots__ = ("cert_file", "context", "key_file", "port_name")

    def __init__(self, port_name: str, cert_file: Path, key_file: Path) -> None:
        self.port_name = port_name
        """``ws`` or ``control``: the settings' section, for errors and logs."""
        self.cert_file = cert_file
        self.key_file = key_file
        try:
            self.context = _context(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{port_name}.tls_cert_file / {port_name}.tls_key_file: {_why(exc)}"
            ) from None

    def reload(self) -> bool:
        """Read the files again; new handshakes get them. A bad file is logged
        and changes nothing (False)."""
        try:
            _context(self.cert_file, self.key_file)  # judged on a scratch context first
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            _log.error(
                "tls.reload_failed",
                port=self.port_name,
                cert_file=str(self.cert_file),
                key_file=str(self.key_file),
                error=_why(exc),
                action="kept the certificate in use",
            )
            return False
        _log.info("tls.reloaded", port=self.port_name, cert_file=str(self.cert_file))
        return True


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
