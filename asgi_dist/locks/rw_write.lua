-- RW lock, write side: exclusive; a waiting writer blocks new readers.
-- KEYS as in rw_read.lua   ARGV[1] token  ARGV[2] ttl ms  ARGV[3] waiter liveness ms
-- Returns {1, fence, ttl} or {0, 0, ms worth waiting} with the writer's intent recorded.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, r in ipairs(expired) do
  redis.call('ZREM', KEYS[1], r)
  redis.call('HDEL', KEYS[3], r)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local holder = redis.call('HGET', KEYS[4], 'token')
if holder == ARGV[1] then
  return {1, tonumber(redis.call('HGET', KEYS[4], 'fence')), redis.call('PTTL', KEYS[4])}
end
if holder == false and redis.call('ZCARD', KEYS[1]) == 0 then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[4], 'token', ARGV[1], 'fence', fence)
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {1, fence, tonumber(ARGV[2])}
end
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[3]), ARGV[1])
if holder ~= false then
  return {0, 0, redis.call('PTTL', KEYS[4])}
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
return {0, 0, tonumber(last[2]) - now}
