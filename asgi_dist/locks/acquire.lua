-- Take a lease if it is free: one round trip that also yields the fencing token.
-- KEYS[1] lease hash {token, fence}   KEYS[2] fence counter (never deleted, so
-- fences keep increasing across holders even after the lease key expired)
-- KEYS[3], KEYS[4] optional: waiting processes and their head waiters (see
-- hand_on.lua)
-- ARGV[1] token (unique per acquisition)   ARGV[2] ttl in ms
-- ARGV[3] waiter ttl ms   ARGV[4] wake-up channel (unused here)
-- ARGV[5] optional: this process's origin tag, when the caller waits on failure
-- (it is then the one waiter of its process that attempts)
-- Returns {1, fence, ttl_ms} when taken, {0, 0, remaining_ms} when held by another.
local holder = redis.call('HGET', KEYS[1], 'token')
if holder == false then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'token', ARGV[1], 'fence', fence)
  -- PEXPIRE runs on the server's clock: no client clock decides expiry.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if KEYS[3] and ARGV[5] then
    redis.call('ZREM', KEYS[3], ARGV[5])  -- served: this process waits no more
    if KEYS[4] then
      redis.call('HDEL', KEYS[4], ARGV[5])
    end
  end
  return {1, fence, tonumber(ARGV[2])}
end
if holder == ARGV[1] then
  -- Handed to us (hand_on.lua) before we heard of it, or a retried attempt whose
  -- first reply was lost: it already holds the lease.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('HGET', KEYS[1], 'fence')), tonumber(ARGV[2])}
end
local remaining = redis.call('PTTL', KEYS[1])
if KEYS[3] and ARGV[5] then
  -- Queue this process (once, keeping its place) to be served by a release, and
  -- name this waiter as the one a release hands the lease to; both outlive the
  -- lease by a waiter ttl, in case no release ever comes.
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[3], 'NX', now[1] * 1000 + math.floor(now[2] / 1000), ARGV[5])
  local expiry = math.max(remaining, 0) + tonumber(ARGV[3])
  redis.call('PEXPIRE', KEYS[3], expiry)
  if KEYS[4] then
    redis.call('HSET', KEYS[4], ARGV[5], ARGV[2] .. ':' .. ARGV[1])
    redis.call('PEXPIRE', KEYS[4], expiry)
  end
end
return {0, 0, remaining}
