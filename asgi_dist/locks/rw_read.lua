-- RW lock, read side (writer-preferring): readers share, unless a writer holds
-- the lock or is waiting for it.
-- KEYS[1] readers zset token -> expiry   KEYS[2] fence counter   KEYS[3] reader fences
-- KEYS[4] writer hash {token, fence}   KEYS[5] waiting writers zset token -> liveness
-- ARGV[1] token  ARGV[2] ttl ms  ARGV[3] (unused)  ARGV[4] channel
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, r in ipairs(expired) do
  redis.call('ZREM', KEYS[1], r)
  redis.call('HDEL', KEYS[3], r)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local ttl = tonumber(ARGV[2])
local writer_ttl = redis.call('PTTL', KEYS[4])
if writer_ttl > 0 then
  return {0, 0, writer_ttl}
end
if redis.call('ZCARD', KEYS[5]) > 0 then
  -- A waiting writer goes first: new readers would starve it.
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then return {0, 0, tonumber(first[2]) - now} end
  return {0, 0, 50}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], fence)
for _, k in ipairs({KEYS[1], KEYS[3]}) do
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return {1, fence, ttl}
