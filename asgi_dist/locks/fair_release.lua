-- Fair release (and abandon): give the lease to the live head of the queue.
-- KEYS as in fair_acquire.lua   ARGV[1] token   ARGV[2] wake-up channel (the
-- prefix of each node's own channel, see below)
-- A token that is only queued (a cancelled or timed-out waiter) leaves the queue.
-- Returns 1 if this token held the lease, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, w in ipairs(dead) do
  redis.call('ZREM', KEYS[3], w)
  redis.call('ZREM', KEYS[4], w)
  redis.call('HDEL', KEYS[5], w)
end
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if head ~= nil then
  -- Direct hand-off: the head owns the lease before it even wakes up, so no
  -- newcomer can barge in between.
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'token', head, 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], redis.call('HGET', KEYS[5], head))
  redis.call('ZREM', KEYS[3], head)
  redis.call('ZREM', KEYS[4], head)
  redis.call('HDEL', KEYS[5], head)
  -- Named, so only the new holder wakes; the rest of the queue sleeps on.
  -- The payload names the recipient by a digest of its token (a token on a
  -- channel would let any subscriber release the lease) and carries the
  -- fence, so the head needs no further round trip.
  -- On the channel of the head's node ('<channel>:<node>', the part of its
  -- token after '@'): the other waiting processes are not even woken.
  local node = string.match(head, '@(.+)$')
  local channel = node and (ARGV[2] .. ':' .. node) or ARGV[2]
  redis.call('PUBLISH', channel, 'to:' .. redis.sha1hex(head) .. ':' .. fence)
else
  redis.call('PUBLISH', ARGV[2], 'released')
end
return 1
