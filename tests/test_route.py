"""Handshake URL parsing: both forms, and every way to get it wrong."""

from __future__ import annotations

import pytest

from broadcastd.core.route import Route, parse_route
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
    ],
)
def test_bad_targets(target: str, code: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse_route(target, 2)
    assert caught.value.code == code
