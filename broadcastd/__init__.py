"""broadcastd: a pub/sub broadcast daemon.

Backends publish over HTTP to the control port; every WebSocket subscriber of
the channel receives the message. See README.md for the manual and
DESIGN-level notes in the module docstrings.
"""

__version__ = "0.1.0"
