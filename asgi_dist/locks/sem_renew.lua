-- Renew one permit (semaphore, rwlock reader) if it is still live.
-- KEYS[1] permits zset   KEYS[2] hash token -> fence (and a semaphore's '~limit'),
-- kept as long as the permits: else a live permit would lose its fence, and a
-- semaphore the limit its permits were granted under.
-- ARGV[1] token   ARGV[2] ttl ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
for _, k in ipairs(KEYS) do
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return 1
