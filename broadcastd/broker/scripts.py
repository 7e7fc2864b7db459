"""The Lua scripts the Redis broker runs: each step that must be atomic is one script.

Keys of one channel share a hash tag, ``{PREFIX:CHANNEL}``, so that they live in
one Redis Cluster slot:

- ``{PREFIX:CHANNEL}:m``  hash: ``e`` the epoch, ``o`` the last offset;
- ``{PREFIX:CHANNEL}:s``  stream: the history, entry id ``0-OFFSET``, fields
  ``t`` (Redis time, seconds) and ``d`` (the payload's JSON text);
- ``{PREFIX:CHANNEL}:k:KEY``  the position an idempotency key was answered with.

A publication travels on the pub/sub channel ``PREFIX:p:CHANNEL`` as
``EPOCH OFFSET JSON``.

Redis can go back in time: started from an older RDB snapshot (a restore from
backup, an RDB-only server that crashed between saves), or after a crash that
lost the writes since its last fsync, it holds a channel in the same epoch at a
lower offset than it already gave out. Continuing that count would give the
lost offsets a second time, to other messages. Redis itself cannot notice (the
snapshot is a consistent older state); only a node that saw the higher offsets
can. So the scripts that continue or begin a channel's count (``PUBLISH``, and
``POSITION`` when it may begin one) are passed the highest position this node
has seen of the channel (``KNOWN_EPOCH KNOWN_OFFSET``; empty and 0 when it
knows none), and begin a new epoch when Redis holds that epoch at a lower
offset. The lost epoch is then never continued, its history is dropped with it,
and the channel's subscribers are told by the epoch change (``resync``).

A node knows the channels it has subscribers of and the last ``SEEN_CHANNELS``
(``broadcastd.broker.redis``) others it published to or read. A channel whose
lost offsets only nodes that are gone, or that have forgotten it, had seen
continues its epoch where Redis is: nothing left can tell those offsets were
given out.
"""

from __future__ import annotations

PUBLISH = """
local meta, stream, seen_key = KEYS[1], KEYS[2], KEYS[3]
local payload, size, ttl_ms, meta_ttl_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local new_epoch, key_ttl_ms, topic, has_key = ARGV[5], ARGV[6], ARGV[7], ARGV[8] == '1'
local known_epoch, known_offset = ARGV[9], tonumber(ARGV[10])
if has_key then
  local seen = redis.call('GET', seen_key)
  if seen then return {seen, 1} end
end
local m = redis.call('HMGET', meta, 'e', 'o')
local epoch = m[1]
if epoch == known_epoch and (tonumber(m[2]) or 0) < known_offset then
  epoch = false
end
if not epoch then
  epoch = new_epoch
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', meta, 'o', 1)
redis.call('PEXPIRE', meta, meta_ttl_ms)
if size > 0 then
  local now = redis.call('TIME')
  redis.call('XADD', stream, 'MAXLEN', size, '0-' .. offset, 't', now[1], 'd', payload)
  redis.call('PEXPIRE', stream, ttl_ms)
end
local position = epoch .. ' ' .. offset
redis.call('PUBLISH', topic, position .. ' ' .. payload)
if has_key then redis.call('SET', seen_key, position, 'PX', key_ttl_ms) end
return {position, 0}
"""
"""Give a payload the channel's next position, keep it, announce it (or answer
the position an idempotency key was given); in a new epoch if the channel has
none, or if Redis holds it behind the position this node saw."""

POSITION = """
local meta, stream, new_epoch, meta_ttl_ms = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local known_epoch, known_offset = ARGV[3], tonumber(ARGV[4])
local m = redis.call('HMGET', meta, 'e', 'o')
local epoch = m[1]
if new_epoch ~= '' and epoch == known_epoch and (tonumber(m[2]) or 0) < known_offset then
  epoch = false
end
if not epoch then
  if new_epoch == '' then return {'', 0} end
  epoch = new_epoch
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', meta, meta_ttl_ms)
end
return {epoch, redis.call('HGET', meta, 'o')}
"""
"""The channel's position; with a new epoch given, begin the channel if it has none
(a subscriber is told an epoch before the first publish, as with one node), or
again if Redis holds it behind the position this node saw."""

HISTORY = """
local meta, stream = KEYS[1], KEYS[2]
local start, count, ttl, newest = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local m = redis.call('HMGET', meta, 'e', 'o')
if not m[1] then return {'', 0, {}} end
local horizon = tonumber(redis.call('TIME')[1]) - ttl
local rows
if newest then
  rows = redis.call('XREVRANGE', stream, '+', start, 'COUNT', count)
else
  rows = redis.call('XRANGE', stream, start, '+', 'COUNT', count)
end
local out = {}
for _, row in ipairs(rows) do
  local fields = row[2]
  if tonumber(fields[2]) >= horizon then
    out[#out + 1] = row[1]
    out[#out + 1] = fields[4]
  end
end
return {m[1], m[2], out}
"""
"""The channel's position and its kept publications from stream id ``start``
(``0-`` and the offset after ``since``, built by the caller: Lua's numbers would
write a large offset as a float) that are not older than the TTL: oldest first,
or the newest ``count`` (newest first)."""

RESTART = """
local meta, stream, old_epoch, new_epoch, meta_ttl_ms = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local epoch = redis.call('HGET', meta, 'e')
if epoch == old_epoch or not epoch then
  epoch = new_epoch
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', meta, meta_ttl_ms)
end
return {epoch, redis.call('HGET', meta, 'o')}
"""
"""Begin a new epoch if the channel is still in ``old_epoch``: Redis went back in
time (it lost acknowledged writes), so offsets of that epoch would be reused."""


# Presence. A channel's entries live beside its stream, under its hash tag:
#
# - ``{PREFIX:CHANNEL}:p:entries``  hash: client id -> ``USER_JSON`` LF
#   ``ENTRY_JSON``;
# - ``{PREFIX:CHANNEL}:p:ids``  sorted set: client ids, all of score 0, in id
#   order (pages by cursor);
# - ``{PREFIX:CHANNEL}:p:users``  hash: user (its JSON text) -> entries of that
#   user (stats without reading every entry).
#
# An entry lives as long as the node that holds it: liveness is per node, not
# per entry, so a heartbeat is one call per node whatever the entries it holds,
# and an entry costs its channel's keys no expiry of their own. Per shard:
#
# - ``{PREFIX}:pnodes``      sorted set: node id by the time it expires (Redis
#   time, ms), pushed on by each of its heartbeats and presence changes;
# - ``{PREFIX}:pn:NODE``     set: the node's entries, as
#   ``TELL_MAX`` LF ``CHANNEL`` LF ``CLIENT``;
# - ``{PREFIX}:pdead``       set: nodes that expired whose entries are being
#   swept.
#
# Each heartbeat moves the nodes that expired to ``pdead`` and sweeps their
# entries, at most SWEEP_BUDGET a call; whichever script removes an entry
# publishes its leave, so each entry's leave is told exactly once, even if the
# node that held the connection is gone. A node that Redis did not know (it
# lost its data, or the node was swept after a pause longer than the TTL) is
# told so, and adds its entries again. Events travel on the channel's pub/sub
# topic as ``! join|leave CLIENT USER_JSON``; no publication starts with ``!``.
# The scripts reach the keys of other channels and nodes than those they are
# given: a Redis Cluster would need them grouped by slot.

PRESENCE_KEYS = (":p:entries", ":p:ids", ":p:users")
"""The suffixes of a channel's presence keys after its hash tag (``{PREFIX:CHANNEL}``)."""

_PRESENCE_FUNCTIONS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(ph, pl, pu, topic, tell_max, client)
  local value = redis.call('HGET', ph, client)
  if not value then return 0 end
  local count = redis.call('HLEN', ph)
  redis.call('HDEL', ph, client)
  redis.call('ZREM', pl, client)
  local user = string.sub(value, 1, string.find(value, '\\n', 1, true) - 1)
  if user ~= 'null' and redis.call('HINCRBY', pu, user, -1) <= 0 then
    redis.call('HDEL', pu, user)
  end
  if tell_max >= 0 and count <= tell_max then
    redis.call('PUBLISH', topic, '! leave ' .. client .. ' ' .. user)
  end
  return 1
end
local function alive(nodes, dead, node, ttl)
  if redis.call('ZADD', nodes, now + ttl, node) == 1 then
    redis.call('SREM', dead, node)
    return 1
  end
  return 0
end
"""

PRESENCE_CHANGE = (
    _PRESENCE_FUNCTIONS
    + """
local nodes, dead, own = KEYS[1], KEYS[2], KEYS[3]
local node, ttl, topic_prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {alive(nodes, dead, node, ttl)}
local a = 4
for c = 4, #KEYS, 3 do
  local ph, pl, pu = KEYS[c], KEYS[c + 1], KEYS[c + 2]
  local channel, tell_max, changes = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local topic = topic_prefix .. channel
  local held = ARGV[a + 1] .. '\\n' .. channel .. '\\n'
  a = a + 3
  for _ = 1, changes do
    local client = ARGV[a + 1]
    if ARGV[a] == '-' then
      drop(ph, pl, pu, topic, tell_max, client)
      redis.call('SREM', own, held .. client)
      a = a + 2
    else
      local user = ARGV[a + 2]
      if redis.call('HSET', ph, client, user .. '\\n' .. ARGV[a + 3]) == 1 then
        redis.call('ZADD', pl, 0, client)
        redis.call('SADD', own, held .. client)
        if user ~= 'null' then redis.call('HINCRBY', pu, user, 1) end
        if tell_max >= 0 and redis.call('HLEN', ph) <= tell_max then
          redis.call('PUBLISH', topic, '! join ' .. client .. ' ' .. user)
        end
      end
      a = a + 4
    end
  end
  out[#out + 1] = redis.call('HLEN', ph)
end
return out
"""
)
"""This node's joins and leaves of several channels, in the order they happened.
KEYS: pnodes, pdead, the node's pn:NODE, then per channel ph, pl, pu. ARGV: the
node id, the TTL (ms), the topic prefix, then per channel its name, the most
entries for which joins and leaves are told (-1: never) and the number of
changes, then each change: ``+ CLIENT USER_JSON ENTRY_JSON`` adds (or replaces)
a client's entry, telling its join if it is new; ``- CLIENT`` removes one,
telling its leave if it was there. Answers 1 if Redis did not know the node
(it must add its entries again), then each channel's entry count.

One call carries every change of a loop turn on a shard (``broadcastd.broker.redis``):
a subscribe storm costs Redis one script run per batch, not one per subscribe."""

PRESENCE_HEARTBEAT = (
    _PRESENCE_FUNCTIONS
    + """
local nodes, dead = KEYS[1], KEYS[2]
local node, ttl, node_prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local key_prefix, topic_prefix, budget = ARGV[4], ARGV[5], tonumber(ARGV[6])
local lost = alive(nodes, dead, node, ttl)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', nodes, gone)
  redis.call('SADD', dead, gone)
end
for _, gone in ipairs(redis.call('SRANDMEMBER', dead, 100)) do
  if budget <= 0 then break end
  local held = node_prefix .. gone
  for _, member in ipairs(redis.call('SPOP', held, budget)) do
    local tell_max, channel, client = string.match(member, '^([^\\n]*)\\n(.*)\\n([^\\n]*)$')
    if client then
      local tag = key_prefix .. channel .. '}'
      drop(tag .. ENTRIES, tag .. IDS, tag .. USERS, topic_prefix .. channel,
        tonumber(tell_max), client)
    end
    budget = budget - 1
  end
  if redis.call('SCARD', held) == 0 then redis.call('SREM', dead, gone) end
end
return {lost, redis.call('SCARD', dead) + redis.call('ZCOUNT', nodes, '-inf', now)}
""".replace("ENTRIES", repr(PRESENCE_KEYS[0]))
    .replace("IDS", repr(PRESENCE_KEYS[1]))
    .replace("USERS", repr(PRESENCE_KEYS[2]))
)
"""A node's heartbeat on one shard: it lives ``ttl`` more; the nodes that
expired are swept, at most ``budget`` of their entries a call (each with its
leave). KEYS: pnodes, pdead. ARGV: the node id, the TTL (ms), the prefix of
nodes' entry sets, the prefix of channels' keys, the topic prefix, the budget.
Answers whether Redis did not know the node, and how many expired nodes are
still to sweep (the caller sweeps on at once while any are)."""

PRESENCE_PAGE = """
local ph, pl = KEYS[1], KEYS[2]
local start, limit = ARGV[1], tonumber(ARGV[2])
local clients = redis.call('ZRANGEBYLEX', pl, start, '+', 'LIMIT', 0, limit + 1)
local out = {}
for i = 1, #clients do
  out[#out + 1] = clients[i]
  out[#out + 1] = redis.call('HGET', ph, clients[i]) or ''
end
return out
"""
"""Up to ``limit + 1`` entries from ``start`` (``-`` or ``(CLIENT``) in client-id
order, as client, value pairs. KEYS: ph, pl."""

PRESENCE_STATS = """
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[2])}
"""
"""Clients and distinct users: two counts, not a read of every entry. KEYS: ph, pu."""
