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
# - ``{PREFIX:CHANNEL}:ph``  hash: client id -> ``USER_JSON`` LF ``ENTRY_JSON``;
# - ``{PREFIX:CHANNEL}:pz``  sorted set: client id by the time its entry expires
#   (Redis time, ms): the expired are found without a scan, as Centrifugo does;
# - ``{PREFIX:CHANNEL}:pl``  sorted set: client ids, all of score 0, in id order
#   (pages by cursor);
# - ``{PREFIX:CHANNEL}:pu``  hash: user (its JSON text) -> entries of that user
#   (stats without reading every entry).
#
# Every script first removes what expired (at most SWEEP_LIMIT entries a call),
# and whichever script removes an entry publishes its leave, so each entry's
# leave is told exactly once, by whoever removed it, even if the node that held
# the connection is gone. Events travel on the channel's pub/sub topic as
# ``! join|leave CLIENT USER_JSON``; no publication starts with ``!``.
#
# Common arguments: KEYS ph, pz, pl, pu; ARGV[1] the topic, ARGV[2] the most
# entries for which joins and leaves are told (-1: never), ARGV[3] the time to
# live of an entry (ms), ARGV[4] that of the keys (ms). ``PRESENCE_CHANGE`` takes
# these per channel (below).

_PRESENCE_FUNCTIONS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(ph, pz, pl, pu, topic, tell_max, client)
  redis.call('ZREM', pz, client)
  redis.call('ZREM', pl, client)
  local value = redis.call('HGET', ph, client)
  if not value then return 0 end
  local count = redis.call('HLEN', ph)
  redis.call('HDEL', ph, client)
  local user = string.sub(value, 1, string.find(value, '\\n', 1, true) - 1)
  if user ~= 'null' and redis.call('HINCRBY', pu, user, -1) <= 0 then
    redis.call('HDEL', pu, user)
  end
  if tell_max >= 0 and count <= tell_max then
    redis.call('PUBLISH', topic, '! leave ' .. client .. ' ' .. user)
  end
  return 1
end
local function sweep(ph, pz, pl, pu, topic, tell_max)
  local expired = redis.call('ZRANGEBYSCORE', pz, '-inf', now, 'LIMIT', 0, 1000)
  for _, client in ipairs(expired) do drop(ph, pz, pl, pu, topic, tell_max, client) end
end
local function keep(ph, pz, pl, pu, key_ttl)
  redis.call('PEXPIRE', ph, key_ttl)
  redis.call('PEXPIRE', pz, key_ttl)
  redis.call('PEXPIRE', pl, key_ttl)
  redis.call('PEXPIRE', pu, key_ttl)
end
"""

_PRESENCE_COMMON = (
    _PRESENCE_FUNCTIONS
    + """
local ph, pz, pl, pu = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local topic, tell_max, ttl, key_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
sweep(ph, pz, pl, pu, topic, tell_max)
"""
)

PRESENCE_CHANGE = (
    _PRESENCE_FUNCTIONS
    + """
local counts = {}
local a = 1
for c = 1, #KEYS, 4 do
  local ph, pz, pl, pu = KEYS[c], KEYS[c + 1], KEYS[c + 2], KEYS[c + 3]
  local topic, tell_max = ARGV[a], tonumber(ARGV[a + 1])
  local ttl, key_ttl, changes = tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
  a = a + 5
  sweep(ph, pz, pl, pu, topic, tell_max)
  for _ = 1, changes do
    local client = ARGV[a + 1]
    if ARGV[a] == '-' then
      drop(ph, pz, pl, pu, topic, tell_max, client)
      a = a + 2
    else
      local user = ARGV[a + 2]
      local new = redis.call('HSET', ph, client, user .. '\\n' .. ARGV[a + 3]) == 1
      redis.call('ZADD', pz, now + ttl, client)
      redis.call('ZADD', pl, 0, client)
      if new and user ~= 'null' then redis.call('HINCRBY', pu, user, 1) end
      if new and tell_max >= 0 and redis.call('HLEN', ph) <= tell_max then
        redis.call('PUBLISH', topic, '! join ' .. client .. ' ' .. user)
      end
      a = a + 4
    end
  end
  keep(ph, pz, pl, pu, key_ttl)
  counts[#counts + 1] = redis.call('HLEN', ph)
end
return counts
"""
)
"""This node's joins and leaves of several channels, in the order they happened:
per channel, KEYS ph, pz, pl, pu, and ARGV the four common arguments, the number
of changes, then each change: ``+ CLIENT USER_JSON ENTRY_JSON`` adds (or
replaces) a client's entry, telling its join if it is new; ``- CLIENT`` removes
one, telling its leave if it was there. Answers each channel's entry count.

One call carries every change of a loop turn on a shard (``broadcastd.broker.redis``):
a subscribe storm costs Redis one script run per batch, not one per subscribe.
Its keys span several channels' hash tags: on a Redis Cluster the changes would
have to be grouped by slot."""

PRESENCE_REFRESH = (
    _PRESENCE_COMMON
    + """
local missing = {redis.call('HLEN', ph)}
for i = 5, #ARGV do
  if redis.call('ZSCORE', pz, ARGV[i]) then
    redis.call('ZADD', pz, now + ttl, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
keep(ph, pz, pl, pu, key_ttl)
return missing
"""
)
"""A node's heartbeat for one channel: its clients' entries live ``ttl`` more.
Answers the count, then the clients whose entries were gone (removed as expired
while the node could not refresh them): the node adds them again."""

PRESENCE_PAGE = (
    _PRESENCE_COMMON
    + """
local start, limit = ARGV[5], tonumber(ARGV[6])
local clients = redis.call('ZRANGEBYLEX', pl, start, '+', 'LIMIT', 0, limit + 1)
local out = {}
for i = 1, #clients do
  out[#out + 1] = clients[i]
  out[#out + 1] = redis.call('HGET', ph, clients[i]) or ''
end
return out
"""
)
"""Up to ``limit + 1`` entries from ``start`` (``-`` or ``(CLIENT``) in client-id
order, as client, value pairs."""

PRESENCE_STATS = (
    _PRESENCE_COMMON
    + """
return {redis.call('HLEN', ph), redis.call('HLEN', pu)}
"""
)
"""Clients and distinct users: two counts, not a read of every entry."""
