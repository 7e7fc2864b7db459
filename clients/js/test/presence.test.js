// Presence against a real daemon: the identity of the first reply, join and leave
// events, and presence() / presenceStats() with their refusals.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import WebSocket from "ws";

import { BroadcastClient, BroadcastError } from "../src/index.js";
import { Daemon, jwt, waitFor } from "./harness.js";

const options = { WebSocket, transport: "websocket", minBackoff: 50, maxBackoff: 300, pingInterval: 0 };
const SECRET = "a-test-secret-of-at-least-32-bytes!!";
const NAMESPACES = [
  { name: "room", presence: true, join_leave: true, presence_for_subscribers: true },
  { name: "quiet", presence: true },
];
const token = (sub) => jwt(SECRET, { sub, exp: Math.floor(Date.now() / 1000) + 3600 });

/** A connected client of `user` (null: no token) subscribed to `channels`. */
async function member(daemon, user, ...channels) {
  const given = user === null ? options : { ...options, token: token(user) };
  const client = new BroadcastClient(daemon.wsUrl, given);
  const subs = channels.map((channel) => client.subscribe(channel));
  client.connect();
  await waitFor(() => subs.every((sub) => sub.state === "subscribed"), 10000, `${user} subscribed`);
  return [client, ...subs];
}

describe("presence", { timeout: 60000 }, () => {
  let daemon;
  before(async () => {
    daemon = await new Daemon({
      args: [
        "--auth-hmac-secret", SECRET,
        "--channels-subscribe", "public",
        "--namespaces", JSON.stringify(NAMESPACES),
        "--presence-max-page", "2", // three clients take two pages
      ],
    }).start();
  });
  after(() => daemon?.stop());

  test("the first reply names the connection; join and leave reach listeners", async () => {
    const [carol, room] = await member(daemon, "carol", "room:a");
    assert.equal(carol.user, "carol");
    assert.match(carol.clientId, /^[0-9a-f]+-[0-9a-f]+$/);
    const onSub = [];
    const onClient = [];
    room.on("join", (e) => onSub.push(e)).on("leave", (e) => onSub.push(e));
    carol.on("join", (e) => onClient.push(e.type));

    const [bob] = await member(daemon, "bob", "room:a");
    await waitFor(() => onSub.length === 1, 10000, "bob's join");
    assert.deepEqual(onSub[0], { type: "join", channel: "room:a", client: bob.clientId, user: "bob" });
    const [guest] = await member(daemon, null, "room:a");
    assert.equal(guest.user, null);
    assert.notEqual(guest.clientId, null);
    await waitFor(() => onSub.length === 2, 10000, "the guest's join");
    assert.deepEqual([onSub[1].client, onSub[1].user], [guest.clientId, null]);
    bob.close();
    await waitFor(() => onSub.length === 3, 10000, "bob's leave");
    assert.deepEqual(onSub[2], { type: "leave", channel: "room:a", client: bob.clientId, user: "bob" });
    assert.deepEqual(onClient, ["join", "join"]); // the client's listeners hear them too
    for (const client of [carol, guest]) client.close();
  });

  test("presence pages, presence stats, and what they refuse", async () => {
    const [alice, room] = await member(daemon, "alice", "room:b", "quiet:b");
    const [bob] = await member(daemon, "bob", "room:b");
    const [guest] = await member(daemon, null, "room:b");

    const first = await alice.presence("room:b");
    assert.deepEqual([first.type, first.channel, first.clients.length], ["presence", "room:b", 2]);
    assert.equal(typeof first.next, "string");
    const rest = await room.presence(first.next);
    assert.deepEqual([rest.clients.length, rest.next], [1, null]);
    const entries = [...first.clients, ...rest.clients];
    const users = Object.fromEntries(entries.map((e) => [e.client, e.user]));
    const expected = { [alice.clientId]: "alice", [bob.clientId]: "bob", [guest.clientId]: null };
    assert.deepEqual(users, expected);
    const stats = await room.presenceStats();
    assert.deepEqual(
      [stats.type, stats.channel, stats.clients, stats.users],
      ["presence_stats", "room:b", 3, 2],
    );

    const errors = [];
    alice.on("error", (e) => errors.push(e));
    const refused = async (promise, code) => {
      const error = await promise.then(() => assert.fail("not refused"), (e) => e);
      assert.ok(error instanceof BroadcastError, String(error));
      assert.equal(error.code, code);
    };
    await refused(alice.presence("room:other"), "not_subscribed");
    await refused(alice.presenceStats("quiet:b"), "presence_not_allowed");
    await refused(alice.presence("room:b", "x".repeat(129)), "bad_command");
    assert.deepEqual(errors, []); // a request's refusal is its own, not an error event
    const pending = alice.presenceStats("room:b");
    alice.close();
    await refused(pending, "network");
    await refused(alice.presence("room:b"), "network");
    for (const client of [bob, guest]) client.close();
  });
});
