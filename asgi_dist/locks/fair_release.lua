-- Fair release (and abandon): give the lease to the live head of the queue.
-- KEYS as in fair_acquire.lua   ARGV[1] token   ARGV[2] wake-up channel (the
-- prefix of each node's own channel, see below)   ARGV[3] (unused: the origin
-- tag of the other release scripts)   ARGV[4] '1' when PUBLISH counts every
-- listener (not on Redis Cluster), so that a head nobody listens for is skipped
-- A token that is only queued (a cancelled or timed-out waiter) leaves the queue.
-- Returns 1 if this token held the lease, else 0.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)

local function drop(w)
  redis.call('ZREM', KEYS[3], w)
  redis.call('ZREM', KEYS[4], w)
  redis.call('HDEL', KEYS[5], w)
end

drop(ARGV[1])
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  drop(w)
end
-- A waiter queued a second ago or more has subscribed to its node's channel (it
-- does right after queueing): if nobody listens there, its process died before
-- its liveness ran out, and a hand-off would sit with it for a whole ttl.
local settled = now_us - 1000000
for _ = 1, 16 do
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  local head = first[1]
  if head == nil then
    break
  end
  -- Direct hand-off: the head owns the lease before it even wakes up, so no
  -- newcomer can barge in between.
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'token', head, 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], redis.call('HGET', KEYS[5], head))
  drop(head)
  -- Named, so only the new holder wakes; the rest of the queue sleeps on.
  -- The payload names the recipient by a digest of its token (a token on a
  -- channel would let any subscriber release the lease) and carries the
  -- fence, so the head needs no further round trip.
  -- On the channel of the head's node ('<channel>:<node>', the part of its
  -- token after '@'): the other waiting processes are not even woken.
  local node = string.match(head, '@(.+)$')
  local channel = node and (ARGV[2] .. ':' .. node) or ARGV[2]
  local heard = redis.call('PUBLISH', channel, 'to:' .. redis.sha1hex(head) .. ':' .. fence)
  if heard > 0 or ARGV[4] ~= '1' or tonumber(first[2]) > settled then
    return 1
  end
  redis.call('DEL', KEYS[1])  -- a dead waiter's: on to the next
end
redis.call('PUBLISH', ARGV[2], 'released')
return 1
