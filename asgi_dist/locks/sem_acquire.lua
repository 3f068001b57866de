-- Semaphore acquire: up to `limit` permits, each an expiring entry.
-- KEYS[1] permits zset token -> expiry (server ms)   KEYS[2] fence counter
-- KEYS[3] hash token -> fence
-- ARGV[1] token  ARGV[2] ttl ms  ARGV[3] (unused)  ARGV[4] channel  ARGV[5] limit
-- KEYS[3] also holds '~limit', the limit the live permits were granted under
-- (a token always holds an '@', so it cannot collide).
-- Returns {1, fence, ttl_ms} or {0, 0, ms until the earliest permit expires},
-- or {-1, limit, 0} if live permits were granted under another limit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Permits of crashed holders expire on the server's clock.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, p in ipairs(expired) do
  redis.call('ZREM', KEYS[1], p)
  redis.call('HDEL', KEYS[3], p)
end
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[5])
local granted_under = tonumber(redis.call('HGET', KEYS[3], '~limit'))
if granted_under and granted_under ~= limit and redis.call('ZCARD', KEYS[1]) > 0 then
  return {-1, granted_under, 0}
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  return {1, tonumber(redis.call('HGET', KEYS[3], ARGV[1])), ttl}
end
if redis.call('ZCARD', KEYS[1]) < limit then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], fence, '~limit', limit)
  -- The structures vanish when the last permit would have expired.
  for _, k in ipairs({KEYS[1], KEYS[3]}) do
    if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  end
  return {1, fence, ttl}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, 0, tonumber(first[2]) - now}
