-- Fair (FIFO) acquire: the lease goes to the head of the waiting queue.
-- KEYS[1] lease hash {token, fence}   KEYS[2] fence counter
-- KEYS[3] queue zset token -> arrival (server µs)   KEYS[4] liveness zset token -> deadline ms
-- KEYS[5] hash token -> the ttl (ms) each waiter asked for
-- ARGV[1] token  ARGV[2] ttl ms  ARGV[3] waiter liveness ms  ARGV[4] wake-up channel
-- ARGV[5] '1' when PUBLISH counts every listener (see fair_release.lua)
-- Returns {1, fence, ttl_ms} when this token holds the lease (maybe handed to it
-- while it slept), else {0, 0, remaining_ms} with the token queued.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)

-- Waiters whose process stopped refreshing (crash, partition) leave the queue,
-- so a dead head cannot block everyone behind it.
local function purge()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  for _, w in ipairs(dead) do
    redis.call('ZREM', KEYS[3], w)
    redis.call('ZREM', KEYS[4], w)
    redis.call('HDEL', KEYS[5], w)
  end
end

local function grant(token, ttl)
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'token', token, 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZREM', KEYS[3], token)
  redis.call('ZREM', KEYS[4], token)
  redis.call('HDEL', KEYS[5], token)
  return fence
end

purge()
local holder = redis.call('HGET', KEYS[1], 'token')
if holder == ARGV[1] then
  -- Handed to us by a release (or a retried attempt): we own it already.
  return {1, tonumber(redis.call('HGET', KEYS[1], 'fence')), redis.call('PTTL', KEYS[1])}
end
if holder == false then
  -- A head queued a second ago or more that nobody listens for is dead (see
  -- fair_release.lua): skipped, as it would sit on the lease for a ttl.
  local settled = now_us - 1000000
  for _ = 1, 16 do
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local head = first[1]
    if head == nil or head == ARGV[1] then
      return {1, grant(ARGV[1], ARGV[2]), tonumber(ARGV[2])}
    end
    -- The previous holder expired without a release: hand the lease to the
    -- live head directly and wake it; we queue behind it.
    local fence = grant(head, redis.call('HGET', KEYS[5], head))
    local node = string.match(head, '@(.+)$')  -- woken on its node's own channel
    local channel = node and (ARGV[4] .. ':' .. node) or ARGV[4]
    local heard = redis.call('PUBLISH', channel, 'to:' .. redis.sha1hex(head) .. ':' .. fence)
    if heard > 0 or ARGV[5] ~= '1' or tonumber(first[2]) > settled then
      break
    end
    redis.call('DEL', KEYS[1])  -- a dead waiter's: on to the next
  end
end
if redis.call('ZSCORE', KEYS[3], ARGV[1]) == false then
  redis.call('ZADD', KEYS[3], now_us, ARGV[1])
end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
return {0, 0, redis.call('PTTL', KEYS[1])}
