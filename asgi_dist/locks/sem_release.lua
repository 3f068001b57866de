-- Semaphore (and rwlock read side) release: drop this token's permit, wake waiters.
-- KEYS[1] permits zset   KEYS[2] fence counter (unused)   KEYS[3] hash token -> fence
-- ARGV[1] token   ARGV[2] channel   ARGV[3] origin tag (see release.lua)
-- Returns 1 if the token held a live permit, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[3])  -- the last permit: nothing is left (not even '~limit')
end
if not expiry or tonumber(expiry) <= now then
  return 0
end
redis.call('PUBLISH', ARGV[2], 'released:' .. (ARGV[3] or ''))
return 1
