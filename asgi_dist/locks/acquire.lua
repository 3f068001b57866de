-- Take a lease if it is free: one round trip that also yields the fencing token.
-- KEYS[1] lease hash {token, fence}   KEYS[2] fence counter (never deleted, so
-- fences keep increasing across holders even after the lease key expired)
-- ARGV[1] token (unique per acquisition)   ARGV[2] ttl in ms
-- Returns {1, fence, ttl_ms} when taken, {0, 0, remaining_ms} when held by another.
local holder = redis.call('HGET', KEYS[1], 'token')
if holder == false then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'token', ARGV[1], 'fence', fence)
  -- PEXPIRE runs on the server's clock: no client clock decides expiry.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, fence, tonumber(ARGV[2])}
end
if holder == ARGV[1] then
  -- A retried attempt whose first reply was lost: it already holds the lease.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('HGET', KEYS[1], 'fence')), tonumber(ARGV[2])}
end
return {0, 0, redis.call('PTTL', KEYS[1])}
