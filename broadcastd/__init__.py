"""broadcastd: a pub/sub broadcast daemon.

Backends publish over HTTP to the control port; every WebSocket subscriber of
the channel receives the message. The manual is under docs/ (README.md points
into it); ARCHITECTURE.md is the map of the code.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("broadcastd")
    """The installed distribution's version: pyproject.toml's, its one source."""
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
