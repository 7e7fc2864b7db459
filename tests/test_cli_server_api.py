"""``broadcastd presence | connections | disconnect | info`` against a real daemon.

The daemon runs in this event loop, so the commands run as asyncio subprocesses;
clients are real WebSocket connections. What each command prints is checked
against what the control API itself answers, line by line, and every refusal
against the daemon's JSON error and the documented exit status.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import ROOT, Running, make_settings, recv_json, running_daemon

SECRET = "c" * 64
TOKEN = "server-api-token"
NAMESPACES = [
    {"name": "room", "presence": True, "join_leave": True, "presence_for_subscribers": True},
    {"name": "plain"},
]
# Pages of two, so that three clients take two pages and the commands must follow `next`.
SETTINGS = {
    "auth__hmac_secret": SECRET,
    "channels__subscribe": "public",
    "namespaces": NAMESPACES,
    "control__token": TOKEN,
    "presence__max_page": 2,
}


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


class Done:
    def __init__(self, status: int, stdout: bytes, stderr: bytes) -> None:
        self.status = status
        self.lines = [json.loads(line) for line in stdout.splitlines()]
        self.stderr = stderr.decode()


async def cli(d: Running | None, *args: str, token: str | None = TOKEN) -> Done:
    """``broadcastd ARGS`` pointed at ``d``'s control port (with ``token``)."""
    options: list[str] = []
    if d is not None:
        options = ["--url", d.control_url]
        if token is not None:
            options += ["--token", token]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broadcastd",
        *args,
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return Done(proc.returncode, stdout, stderr)


async def member(d: Running, user: str | None, channel: str) -> tuple[Any, str]:
    """A connection of ``user`` (None: without a token) subscribed to ``channel``,
    and its client id, from its first reply."""
    query = f"/?channel={channel}" + (f"&token={token(user)}" if user else "")
    ws = await d.connect(query, max_queue=None)
    first = await recv_json(ws)
    if first["type"] == "authenticated":
        assert (await recv_json(ws))["type"] == "subscribed"
    return ws, first["client"]


async def control(d: Running, path: str, **params: Any) -> dict[str, Any]:
    """Every page of a listing, joined, as the control API answers it."""
    key = "clients" if "presence" in path else "connections"
    entries: list[dict[str, Any]] = []
    while True:
        response = await d.http.get(
            path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        entries += page[key]
        if page["next"] is None:
            return {key: entries}
        params["cursor"] = page["next"]


async def test_listings_print_every_entry_of_every_page_as_one_json_line() -> None:
    async with running_daemon(make_settings(**SETTINGS)) as d:
        alice, _ = await member(d, "alice", "room:a")
        bob, _ = await member(d, "bob", "room:a")
        guest, guest_id = await member(d, None, "room:a")
        elsewhere, _ = await member(d, "alice", "plain:b")

        # Independent reads: run side by side.
        listed, first_two, one, stats, everyone, alices, in_room, nodes = await asyncio.gather(
            cli(d, "presence", "room:a"),
            cli(d, "presence", "room:a", "--limit", "2"),
            cli(d, "presence", "room:a", "--limit", "1"),
            cli(d, "presence", "room:a", "--stats"),
            cli(d, "connections"),
            cli(d, "connections", "--user", "alice"),
            cli(d, "connections", "--channel", "room:a"),
            cli(d, "info"),
        )
        assert (listed.status, listed.stderr) == (0, "")
        assert listed.lines == (await control(d, "/channels/room:a/presence"))["clients"]
        assert [e["user"] for e in listed.lines].count(None) == 1
        assert guest_id in {e["client"] for e in listed.lines}
        assert first_two.lines == listed.lines[:2]
        assert one.lines == listed.lines[:1]
        assert stats.lines == [{"channel": "room:a", "clients": 3, "users": 2}]

        assert everyone.status == 0
        assert everyone.lines == (await control(d, "/connections"))["connections"]
        assert len(everyone.lines) == 4
        assert sorted(c["channels"][0] for c in alices.lines) == ["plain:b", "room:a"]
        assert {c["user"] for c in alices.lines} == {"alice"}
        assert len(in_room.lines) == 3

        assert nodes.status == 0
        assert [n["node"] for n in nodes.lines] == [d.daemon.node.id]
        assert nodes.lines[0]["clients"] == 4
        for ws in (alice, bob, guest, elsewhere):
            await ws.close()


async def test_disconnect_closes_with_the_code_and_reason_given() -> None:
    async with running_daemon(make_settings(**SETTINGS)) as d:
        alice_room, _ = await member(d, "alice", "room:a")
        alice_plain, _ = await member(d, "alice", "plain:b")
        bob, bob_id = await member(d, "bob", "room:a")

        banned = await cli(d, "disconnect", "--user", "alice", "--code", "4403", "--reason", "ban")
        assert (banned.status, banned.lines) == (0, [{"disconnected": 2}])
        for ws in (alice_room, alice_plain):
            await closed_with(ws, 4403, "ban")

        one = await cli(d, "disconnect", "--client", bob_id)
        assert one.lines == [{"disconnected": 1}]
        await closed_with(bob, 4010, "disconnected by the server")
        nobody = await cli(d, "disconnect", "--user", "alice")
        assert (nobody.status, nobody.lines) == (0, [{"disconnected": 0}])


async def closed_with(ws: Any, code: int, reason: str) -> None:
    """Read (join and leave events) until the server closes ``ws`` with ``code``."""
    with pytest.raises(ConnectionClosed) as closed:
        await events_until_closed(ws)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, reason)


async def events_until_closed(ws: Any) -> None:
    while True:
        assert (await recv_json(ws))["type"] in ("join", "leave")


async def test_refusals_show_the_daemons_error_and_exit_1() -> None:
    async with running_daemon(make_settings(**SETTINGS)) as d:
        refused = [
            (("presence", "nons:a"), 400, "unknown_namespace"),
            (("presence", "plain:a", "--stats"), 404, "presence_disabled"),
            (("presence", "bad name"), 400, "bad_channel"),
            (("disconnect", "--user", "a", "--code", "5000"), 400, "bad_command"),
            (("disconnect", "--client", "x", "--reason", "r" * 124), 400, "bad_command"),
            (("connections", "--channel", "bad name"), 400, "bad_request"),
        ]
        answers = await asyncio.gather(*(cli(d, *args) for args, _, _ in refused))
        for (args, status, code), done in zip(refused, answers, strict=True):
            assert (done.status, done.lines) == (1, []), (args, done.stderr)
            prefix = f"broadcastd: HTTP {status}: "
            assert done.stderr.startswith(prefix), (args, done.stderr)
            error = json.loads(done.stderr.removeprefix(prefix))["error"]
            assert error["code"] == code, (args, error)

        no_token = await cli(d, "info", token=None)
        assert no_token.status == 1
        assert no_token.stderr.startswith("broadcastd: HTTP 401: ")

    usage_errors = [
        ("disconnect",),  # neither --user nor --client
        ("disconnect", "--user", "a", "--client", "b"),
        ("presence", "room:a", "--limit", "0"),
        ("presence",),
    ]
    answers = await asyncio.gather(
        *(cli(None, *args) for args in usage_errors),
        cli(None, "connections", "--url", "http://127.0.0.1:9"),
    )
    for args, usage in zip(usage_errors, answers, strict=False):
        assert usage.status == 2, args
        assert "usage: broadcastd" in usage.stderr
    unreachable = answers[-1]
    assert unreachable.status == 1
    assert unreachable.stderr.startswith("broadcastd: cannot reach the daemon: ")


async def test_the_configuration_gives_the_control_port_and_token(tmp_path: Path) -> None:
    """As for ``publish``: on the daemon's host no flag is needed."""
    async with running_daemon(make_settings(**SETTINGS)) as d:
        config = tmp_path / "broadcastd.toml"
        config.write_text(
            f'[control]\nhost = "127.0.0.1"\nport = {d.daemon.control.port}\ntoken = "{TOKEN}"\n'
        )
        nodes = await cli(None, "info", "--config", str(config))
        assert (nodes.status, nodes.stderr) == (0, "")
        assert [n["node"] for n in nodes.lines] == [d.daemon.node.id]
