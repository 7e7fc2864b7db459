"""Presence, join and leave on a real daemon, on both engines, with real clients.

Each case runs against the memory engine and a real redis-server: entries,
pages and stats, the events a witness sees as others come and go (by close, by
a reset, by the server API's disconnect, by a token's expiry), the subscriber
commands, and every bad input of the routes and commands with its 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import DaemonProcess, Engine, Running, make_settings, recv_json, running_daemon
from .redisserver import RedisServer

SECRET = "p" * 64
NAMESPACES = [
    {"name": "room", "presence": True, "join_leave": True, "presence_for_subscribers": True},
    {"name": "quiet", "presence": True},
    {"name": "plain"},
    {"name": "small", "presence": True, "join_leave": True, "join_leave_max_subscribers": 2},
]
SETTINGS = {"auth__hmac_secret": SECRET, "channels__subscribe": "public", "namespaces": NAMESPACES}


def token(sub: str, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.fixture
def engine(engine: Engine) -> Engine:
    """conftest's engine, with this file's namespaces and secret as the defaults."""
    return lambda **overrides: engine(**{**SETTINGS, **overrides})


async def join(d: Running, user: str, channel: str) -> tuple[Any, dict[str, Any]]:
    """A client of ``user`` subscribed to ``channel``; its socket and first replies."""
    # Frames it does not read must not stop it reading its close (max_queue).
    ws = await d.connect(f"/?channel={channel}&token={token(user)}", max_queue=None)
    authenticated = await recv_json(ws)
    assert authenticated["type"] == "authenticated", authenticated
    reply = await recv_json(ws)
    assert reply["type"] == "subscribed", reply
    return ws, authenticated


async def event(ws: Any) -> dict[str, Any]:
    """The next join or leave (other frames are not expected here)."""
    doc = await recv_json(ws)
    assert doc["type"] in ("join", "leave"), doc
    return doc


async def closed(ws: Any) -> None:
    """Read join and leave events until the server closes."""
    while True:
        try:
            doc = await recv_json(ws)
        except ConnectionClosed:
            return
        assert doc["type"] in ("join", "leave", "expiring"), doc


async def presence(d: Running, channel: str, **query: Any) -> dict[str, Any]:
    response = await d.http.get(f"/channels/{channel}/presence", params=query)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def stats(d: Running, channel: str) -> tuple[int, int]:
    response = await d.http.get(f"/channels/{channel}/presence/stats")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["channel"] == channel
    return doc["clients"], doc["users"]


async def test_a_witness_sees_who_comes_and_goes(engine: Engine) -> None:
    async with engine(auth__leeway=0) as d:
        witness, me = await join(d, "carol", "room:a")
        assert me["user"] == "carol"
        assert me["client"]
        alice, alice_me = await join(d, "alice", "room:a")
        bob, bob_me = await join(d, "bob", "room:a")
        assert await event(witness) == {
            "type": "join",
            "channel": "room:a",
            "client": alice_me["client"],
            "user": "alice",
        }
        assert (await event(witness))["client"] == bob_me["client"]
        # Over Redis a join made just before a client joined may reach it after.
        seen = [await event(alice)]
        while seen[-1]["user"] != "bob":
            seen.append(await event(alice))
        assert alice_me["client"] not in {e["client"] for e in seen}  # never its own join
        assert await stats(d, "room:a") == (3, 3)
        entries = (await presence(d, "room:a"))["clients"]
        assert {e["user"] for e in entries} == {"alice", "bob", "carol"}
        alice_entry = next(e for e in entries if e["user"] == "alice")
        assert alice_entry["client"] == alice_me["client"]
        assert alice_entry["node"] == d.daemon.node.id
        assert abs(alice_entry["connected_at"] - time.time()) < 60
        # By close.
        await alice.close()
        assert await event(witness) == {
            "type": "leave",
            "channel": "room:a",
            "client": alice_me["client"],
            "user": "alice",
        }
        # By a reset.
        bob.transport.abort()
        assert (await event(witness))["client"] == bob_me["client"]
        assert await stats(d, "room:a") == (1, 1)
        # By the server API's disconnect.
        dave, dave_me = await join(d, "dave", "room:a")
        assert (await event(witness))["type"] == "join"
        response = await d.http.post("/disconnect", json={"user": "dave", "code": 4321})
        assert response.json() == {"disconnected": 1}
        assert await event(witness) == {
            "type": "leave",
            "channel": "room:a",
            "client": dave_me["client"],
            "user": "dave",
        }
        with pytest.raises(ConnectionClosed):
            await recv_json(dave)
        assert (dave.close_code, dave.close_reason) == (4321, "disconnected by the server")
        # By a token's expiry.
        short = jwt.encode({"sub": "eve", "exp": int(time.time()) + 2}, SECRET, algorithm="HS256")
        async with d.connect(f"/?channel=room:a&token={short}") as eve:
            eve_client = (await recv_json(eve))["client"]
            assert (await recv_json(eve))["type"] == "subscribed"
            assert (await event(witness))["user"] == "eve"
            assert await event(witness) == {
                "type": "leave",
                "channel": "room:a",
                "client": eve_client,
                "user": "eve",
            }
            await closed(eve)
            assert eve.close_code == 4003
        assert await stats(d, "room:a") == (1, 1)
        await witness.close()


@asynccontextmanager
async def redis_nodes(
    server: RedisServer, count: int, **overrides: Any
) -> AsyncIterator[list[Running]]:
    """``count`` daemons sharing one redis-server."""
    settings = make_settings(
        broker__type="redis",
        broker__redis__url=server.url,
        broker__redis__probe_interval=0.1,
        broker__redis__backoff_max=0.2,
        **{**SETTINGS, **overrides},
    )
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(running_daemon(settings)) for _ in range(count)]
        yield nodes


async def test_three_nodes_share_presence_and_a_disconnect_reaches_them_all(
    redis_server: RedisServer,
) -> None:
    async with redis_nodes(redis_server, 3) as nodes:
        witness, _ = await join(nodes[0], "carol", "room:x")
        alices = [(await join(node, "alice", "room:x"))[0] for node in nodes]
        bob, _ = await join(nodes[2], "bob", "room:x")
        joins = [await event(witness) for _ in range(4)]
        assert sorted(e["user"] for e in joins) == ["alice"] * 3 + ["bob"]
        for node in nodes:  # the union, whichever node is asked
            assert await stats(node, "room:x") == (5, 3)
            doc = await presence(node, "room:x", limit=2)
            entries = doc["clients"]
            while doc["next"] is not None:
                doc = await presence(node, "room:x", limit=2, cursor=doc["next"])
                entries += doc["clients"]
            assert sorted(e["user"] for e in entries) == ["alice"] * 3 + ["bob", "carol"]
            assert {e["node"] for e in entries} == {n.daemon.node.id for n in nodes}
        listed = (await nodes[1].http.get("/connections", params={"user": "alice"})).json()
        assert listed["count"] == 3
        assert listed["next"] is None
        assert {c["node"] for c in listed["connections"]} == {n.daemon.node.id for n in nodes}
        assert all(c["channels"] == ["room:x"] for c in listed["connections"])
        info = (await nodes[2].http.get("/info")).json()
        assert sorted(n["node"] for n in info["nodes"]) == sorted(n.daemon.node.id for n in nodes)
        assert sum(n["clients"] for n in info["nodes"]) == 5
        started = time.monotonic()
        response = await nodes[1].http.post(
            "/disconnect", json={"user": "alice", "code": 4455, "reason": "banned"}
        )
        assert response.json() == {"disconnected": 3}
        for ws in alices:
            await closed(ws)
            assert (ws.close_code, ws.close_reason) == (4455, "banned")
        assert time.monotonic() - started < 1.0
        leaves = [await event(witness) for _ in range(3)]
        assert [e["type"] for e in leaves] == ["leave"] * 3
        assert await stats(nodes[0], "room:x") == (2, 2)
        await bob.close()
        await witness.close()


async def ready(url: str) -> None:
    """Until the daemon at ``url`` is ready (its broker connected)."""
    async with httpx.AsyncClient(base_url=url) as http:
        async with asyncio.timeout(30):
            while (await http.get("/readyz")).status_code != 200:
                pass  # each try is a round trip to the daemon


async def test_a_killed_node_s_clients_leave_once_each_within_the_ttl(
    redis_server: RedisServer,
) -> None:
    ttl = 1.5
    env = {
        "BROADCASTD_BROKER__TYPE": "redis",
        "BROADCASTD_BROKER__REDIS__URL": redis_server.url,
        "BROADCASTD_PRESENCE__TTL": str(ttl),
        "BROADCASTD_AUTH__HMAC_SECRET": SECRET,
        "BROADCASTD_CHANNELS__SUBSCRIBE": "public",
        "BROADCASTD_NAMESPACES": json.dumps(NAMESPACES),
    }
    doomed = DaemonProcess(env=env)
    try:
        await asyncio.to_thread(doomed.wait_ready)
        await ready(f"http://127.0.0.1:{doomed.control_port}")
        async with redis_nodes(redis_server, 2, presence__ttl=ttl) as nodes:
            witness, _ = await join(nodes[0], "carol", "room:k")
            other, _ = await join(nodes[1], "dave", "room:k")
            assert (await event(witness))["user"] == "dave"
            url = f"ws://127.0.0.1:{doomed.ws_port}"
            victims = []
            for user in ("alice", "bob"):
                ws = await connect(f"{url}/?channel=room:k&token={token(user)}", compression=None)
                victims.append(((await recv_json(ws))["client"], ws))
                assert (await recv_json(ws))["type"] == "subscribed"
            joined = {(await event(witness))["client"] for _ in victims}
            assert joined == {client for client, _ in victims}
            assert await stats(nodes[1], "room:k") == (4, 4)
            doomed.kill()
            killed = time.monotonic()
            leaves = [await event(witness) for _ in victims]
            waited = time.monotonic() - killed
            assert {e["client"] for e in leaves} == joined
            assert {e["type"] for e in leaves} == {"leave"}
            assert waited <= ttl + ttl / 3 + 0.5, waited
            for node in nodes:  # each read sweeps: nothing is left to leave twice
                assert await stats(node, "room:k") == (2, 2)
            await nodes[1].publish("room:k", "after")
            assert (await recv_json(witness))["data"] == "after"
            for _, ws in victims:
                await ws.close()
            await other.close()
            await witness.close()
    finally:
        doomed.kill()


async def test_server_side_subscribe_recovers_and_unsubscribe_stops_at_once(engine: Engine) -> None:
    async with engine(namespaces=[*NAMESPACES, {"name": "feed", "history_size": 100}]) as d:
        ws, me = await join(d, "alice", "plain:lobby")
        first = await d.publish("feed:a", 0)
        for i in range(1, 5):
            await d.publish("feed:a", i)
        since = {"epoch": first["epoch"], "offset": first["offset"]}
        response = await d.http.post(
            "/subscribe", json={"client": me["client"], "channel": "feed:a", "since": since}
        )
        assert response.json() == {"subscribed": 1}
        reply = await recv_json(ws)
        assert (reply["type"], reply["channel"], reply["recovered"]) == (
            "subscribed",
            "feed:a",
            True,
        )
        assert [(await recv_json(ws))["data"] for _ in range(4)] == [1, 2, 3, 4]
        await d.publish("feed:a", 5)
        assert (await recv_json(ws))["data"] == 5
        again = await d.http.post("/subscribe", json={"user": "alice", "channel": "feed:a"})
        assert again.json() == {"subscribed": 0}  # subscribed already
        response = await d.http.post("/unsubscribe", json={"user": "alice", "channel": "feed:a"})
        assert response.json() == {"unsubscribed": 1}
        published = await d.publish("feed:a", 6)  # after the answer: never delivered
        assert published["subscribers"] == 0
        assert await recv_json(ws) == {
            "type": "unsubscribed",
            "channel": "feed:a",
            "reason": "server",
        }
        await d.publish("plain:lobby", "still here")
        assert (await recv_json(ws))["data"] == "still here"
        nobody = await d.http.post("/unsubscribe", json={"user": "zed", "channel": "feed:a"})
        assert nobody.json() == {"unsubscribed": 0}
        await ws.close()


async def test_subscribers_ask_for_presence_where_allowed(engine: Engine) -> None:
    async with engine() as d:
        ws, me = await join(d, "alice", "room:q")
        other, _ = await join(d, "bob", "room:q")
        assert (await event(ws))["user"] == "bob"
        await ws.send(json.dumps({"op": "presence_stats", "channel": "room:q", "id": 1}))
        assert await recv_json(ws) == {
            "type": "presence_stats",
            "channel": "room:q",
            "clients": 2,
            "users": 2,
            "id": 1,
        }
        await ws.send(json.dumps({"op": "presence", "channel": "room:q"}))
        page = await recv_json(ws)
        assert (page["type"], page["next"]) == ("presence", None)
        assert sorted(e["user"] for e in page["clients"]) == ["alice", "bob"]
        assert me["client"] in {e["client"] for e in page["clients"]}
        refusals = [
            ({"op": "presence", "channel": "room:other"}, "not_subscribed"),
            ({"op": "presence", "channel": "room:q", "cursor": 5}, "bad_command"),
            ({"op": "presence", "channel": "room:q", "cursor": "x" * 129}, "bad_command"),
            ({"op": "presence_stats"}, "bad_command"),
            ({"op": "presence", "channel": "bad channel"}, "bad_channel"),
        ]
        for command, code in refusals:
            await ws.send(json.dumps(command))
            reply = await recv_json(ws)
            assert (reply["type"], reply["code"]) == ("error", code), (command, reply)
        quiet, _ = await join(d, "alice", "quiet:q")
        await quiet.send(json.dumps({"op": "presence", "channel": "quiet:q"}))
        assert (await recv_json(quiet))["code"] == "presence_not_allowed"
        plain, _ = await join(d, "alice", "plain:q")
        await plain.send(json.dumps({"op": "presence_stats", "channel": "plain:q"}))
        assert (await recv_json(plain))["code"] == "presence_disabled"
        for socket in (ws, other, quiet, plain):
            await socket.close()


async def test_join_and_leave_stop_beyond_the_bound_and_the_reply_says_so(engine: Engine) -> None:
    async with engine() as d:
        first, _ = await join(d, "a", "small:r")
        second = await d.connect(f"/?channel=small:r&token={token('b')}")
        assert (await recv_json(second))["type"] == "authenticated"
        assert (await recv_json(second))["join_leave"] is True
        assert (await event(first))["user"] == "b"
        third = await d.connect(f"/?channel=small:r&token={token('c')}")
        assert (await recv_json(third))["type"] == "authenticated"
        assert (await recv_json(third))["join_leave"] is False  # 3 > 2: no join told
        await third.close()
        await d.publish("small:r", "marker")  # the next frame: nothing came between
        assert (await recv_json(first))["data"] == "marker"
        assert await stats(d, "small:r") == (2, 2)
        await second.close()
        assert (await event(first))["type"] == "leave"  # 2 entries: told again
        await first.close()


BAD_GETS = [
    ("/channels/plain:a/presence", 404, "presence_disabled"),
    ("/channels/plain:a/presence/stats", 404, "presence_disabled"),
    ("/channels/nons:a/presence", 400, "unknown_namespace"),
    ("/channels/room:a/presence?limit=0", 400, "bad_request"),
    ("/channels/room:a/presence?limit=1001", 400, "bad_request"),
    ("/channels/room:a/presence?limit=x", 400, "bad_request"),
    ("/channels/room:a/presence?cursor=" + "x" * 129, 400, "bad_request"),
    ("/channels/room:a/presence?cursor=", 400, "bad_request"),
    ("/channels/room:a/presence?what=1", 400, "bad_request"),
    ("/channels/room:a/presence?limit=1&limit=2", 400, "bad_request"),
    ("/channels/room:a/presence/stats?x=1", 400, "bad_request"),
    ("/channels/room:a/presence/other", 404, "not_found"),
    ("/connections?limit=0", 400, "bad_request"),
    ("/connections?channel=bad%20name", 400, "bad_request"),
    ("/connections?user=", 400, "bad_request"),
    ("/connections?sort=1", 400, "bad_request"),
    ("/info?x=1", 400, "bad_request"),
]
BAD_POSTS = [
    ("/disconnect", b"not json", 400, "bad_json"),
    ("/disconnect", b"[]", 400, "bad_command"),
    ("/disconnect", b"{}", 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "client": "b"}', 400, "bad_command"),
    ("/disconnect", b'{"user": ""}', 400, "bad_command"),
    ("/disconnect", b'{"user": 5}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "code": 3999}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "code": 5000}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "code": "4000"}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "code": true}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "code": 4000.5}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "reason": 1}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "reason": "' + b"r" * 124 + b'"}', 400, "bad_command"),
    ("/disconnect", b'{"user": "a", "extra": 1}', 400, "bad_command"),
    ("/unsubscribe", b'{"user": "a"}', 400, "bad_command"),
    ("/unsubscribe", b'{"user": "a", "channel": "bad name"}', 400, "bad_command"),
    ("/unsubscribe", b'{"channel": "room:a"}', 400, "bad_command"),
    ("/subscribe", b'{"user": "a", "channel": "nons:a"}', 400, "unknown_namespace"),
    ("/subscribe", b'{"user": "a", "channel": "room:a", "since": 5}', 400, "bad_command"),
    ("/subscribe", b'{"user": "a", "channel": "room:a", "since": null}', 400, "bad_command"),
    ("/subscribe", b'{"user": "a", "channel": "room:a", "since": {"last": 0}}', 400, "bad_command"),
]


async def test_every_bad_request_is_a_4xx_with_a_json_error(engine: Engine) -> None:
    async with engine() as d:
        for path, status, code in BAD_GETS:
            response = await d.http.get(path)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), path
        for path, body, status, code in BAD_POSTS:
            response = await d.http.post(path, content=body)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
                path,
                body,
            )
        response = await d.http.post(
            "/disconnect", content=b'{"user": "a"}', headers={"Content-Type": "text/plain"}
        )
        assert response.status_code == 415
        assert (await d.http.get("/disconnect")).status_code == 405
        assert (await d.http.post("/info")).status_code == 405


async def test_scopes_of_the_presence_and_server_api_routes(daemon_factory: Any) -> None:
    def entry(name: str, secret: str, scopes: list[str], **more: Any) -> dict[str, Any]:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        return {"name": name, "sha256": digest, "scopes": scopes, **more}

    tokens = [
        entry("pub", "publisher-p", ["publish"]),
        entry("reader", "reader-r", ["read"]),
        entry("admin", "admin-a", ["admin"]),
        entry("rooms", "rooms-admin", ["admin"], namespaces=["room:*"]),
    ]
    gets = ["/channels/room:a/presence", "/channels/room:a/presence/stats", "/connections", "/info"]
    posts = [
        ("/disconnect", {"user": "a"}),
        ("/unsubscribe", {"user": "a", "channel": "room:a"}),
        ("/subscribe", {"user": "a", "channel": "room:a"}),
    ]
    async with daemon_factory(**SETTINGS, control__tokens=tokens) as d:

        def auth(secret: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {secret}"}

        for path in gets:
            assert (await d.http.get(path)).status_code == 401
            assert (await d.http.get(path, headers=auth("publisher-p"))).status_code == 403
            assert (await d.http.get(path, headers=auth("reader-r"))).status_code == 200
            assert (await d.http.get(path, headers=auth("admin-a"))).status_code == 200
        for path, body in posts:
            for secret, status in (("publisher-p", 403), ("reader-r", 403), ("admin-a", 200)):
                response = await d.http.post(path, json=body, headers=auth(secret))
                assert response.status_code == status, (path, secret, response.text)
                if status == 403:
                    assert response.json()["error"]["code"] == "forbidden"
        rooms = auth("rooms-admin")
        assert (await d.http.get("/channels/plain:a/presence", headers=rooms)).status_code == 403
        assert (await d.http.get("/connections?channel=plain:a", headers=rooms)).status_code == 403
        for path, body in posts[1:]:
            outside = {**body, "channel": "plain:a"}
            assert (await d.http.post(path, json=outside, headers=rooms)).status_code == 403
            assert (await d.http.post(path, json=body, headers=rooms)).status_code == 200
        # Its connection listing shows only the channels it covers.
        ws, _ = await join(d, "alice", "room:a")
        await ws.send(json.dumps({"op": "subscribe", "channel": "plain:a"}))
        assert (await recv_json(ws))["type"] == "subscribed"
        listed = (await d.http.get("/connections", headers=rooms)).json()
        assert listed["connections"][0]["channels"] == ["room:a"]
        listed = (await d.http.get("/connections", headers=auth("admin-a"))).json()
        assert sorted(listed["connections"][0]["channels"]) == ["plain:a", "room:a"]
        assert (
            await d.http.post("/disconnect", json={"user": "alice"}, headers=rooms)
        ).status_code == 403
        await ws.close()


async def test_a_token_s_info_claim_is_shown_in_presence_and_the_listing(engine: Engine) -> None:
    info = {"name": "Alice", "avatar": "/a.png", "tags": [1, 2]}
    async with engine() as d:
        ws = await d.connect(f"/?channel=room:i&token={token('alice', info=info)}")
        assert (await recv_json(ws))["type"] == "authenticated"
        assert (await recv_json(ws))["type"] == "subscribed"
        plain, _ = await join(d, "bob", "room:i")
        entries = {e["user"]: e for e in (await presence(d, "room:i"))["clients"]}
        assert entries["alice"]["info"] == info
        assert "info" not in entries["bob"]
        listed = (await d.http.get("/connections", params={"channel": "room:i"})).json()
        by_user = {c["user"]: c for c in listed["connections"]}
        assert by_user["alice"]["info"] == info
        assert "info" not in by_user["bob"]
        for socket in (ws, plain):
            await socket.close()


async def test_the_deadline_for_holding_no_channel_follows_the_server_api(engine: Engine) -> None:
    """Unsubscribed of its last channel by the server, a connection must subscribe
    within ``ws.subscribe_timeout`` like any other; subscribed by the server, it
    holds a channel again and stays. A connection opened later with no channel,
    closed at its own deadline, shows that the first one's has passed."""
    async with engine(ws__subscribe_timeout=0.3) as d:
        dropped, first = await join(d, "alice", "plain:a")
        kept, second = await join(d, "bob", "plain:b")
        await kept.send(json.dumps({"op": "unsubscribe", "channel": "plain:b"}))
        assert (await recv_json(kept))["type"] == "unsubscribed"
        response = await d.http.post(
            "/subscribe", json={"client": second["client"], "channel": "plain:c"}
        )
        assert response.json() == {"subscribed": 1}
        assert (await recv_json(kept))["type"] == "subscribed"
        response = await d.http.post(
            "/unsubscribe", json={"client": first["client"], "channel": "plain:a"}
        )
        assert response.json() == {"unsubscribed": 1}
        assert (await recv_json(dropped))["reason"] == "server"
        async with asyncio.timeout(30):
            await dropped.wait_closed()
        assert dropped.close_code == 4000
        async with d.connect("/") as later, asyncio.timeout(30):
            await later.wait_closed()
        await d.publish("plain:c", "still here")
        assert (await recv_json(kept))["data"] == "still here"
        await kept.close()
