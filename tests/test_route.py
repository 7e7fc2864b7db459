"""Handshake URL parsing: both forms, and every way to get it wrong."""

from __future__ import annotations

import pytest

from broadcastd.core.route import Route, parse_route
from broadcastd.core.stream import Last, Position
from broadcastd.errors import ClientError


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/", Route((), False)),
        ("/?channel=a&channel=b", Route(("a", "b"), False)),
        ("/a,b", Route(("a", "b"), False)),
        ("/a?channel=b&format=raw", Route(("a", "b"), True)),
        ("/a?channel=a&format=json", Route(("a",), False)),
        ("/?channel=room%3A1", Route(("room:1",), False)),
        (
            "/?since=room:1:ab3de:41&since=b:last:5",
            Route(("room:1", "b"), False, (("room:1", Position("ab3de", 41)), ("b", Last(5)))),
        ),
        ("/a?since=a:e-_1:0", Route(("a",), False, (("a", Position("e-_1", 0)),))),
        (
            f"/?since=a:ep:{2**63 - 1}&since=b:last:05",
            Route(("a", "b"), False, (("a", Position("ep", 2**63 - 1)), ("b", Last(5)))),
        ),
    ],
)
def test_good_targets(target: str, route: Route) -> None:
    assert parse_route(target, 10) == route


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("/a,,b", "bad_channel"),
        ("/a%20b", "bad_channel"),
        ("/a/b", "bad_channel"),
        ("/?channel=", "bad_channel"),
        ("/?channel=a%2Cb", "bad_channel"),
        ("/?chanel=a", "bad_request"),
        ("/?format=xml", "bad_request"),
        ("/?channel", "bad_request"),
        ("/?channel=a&channel=b&channel=c", "too_many_channels"),
        ("/?since=a:1", "bad_request"),
        ("/?since=a:last:0", "bad_request"),
        ("/?since=a:ep:-1", "bad_request"),
        ("/?since=a:e%20p:1", "bad_request"),
        ("/?since=:ep:1", "bad_request"),
        ("/?since=a%20b:ep:1", "bad_channel"),
        ("/?since=a:ep:1&since=b:ep:1&since=c:ep:1", "too_many_channels"),
        # Digits to str.isdigit() that int() refuses, or reads: ASCII digits only.
        ("/?since=a:ep:%C2%B2", "bad_request"),
        ("/?since=a:last:%C2%B2", "bad_request"),
        ("/?since=a:ep:%D9%A3", "bad_request"),
        ("/?since=a:ep:%EF%BC%91", "bad_request"),  # FULLWIDTH DIGIT ONE
        ("/?since=a:ep:" + "1" * 5000, "bad_request"),  # past int()'s 4300 digits
        (f"/?since=a:ep:{2**63}", "bad_request"),  # past a signed 64-bit offset
        (f"/?since=a:last:{2**64}", "bad_request"),
        ("/?since=a:ep:+1", "bad_request"),
        ("/?since=a:ep:1_0", "bad_request"),
        ("/?since=a:ep:", "bad_request"),
    ],
)
def test_bad_targets(target: str, code: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse_route(target, 2)
    assert caught.value.code == code
