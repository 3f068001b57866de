-- RW lock, write side release (and abandon): drop the intent, free the lock.
-- KEYS as in rw_read.lua   ARGV[1] token   ARGV[2] channel
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('HGET', KEYS[4], 'token') ~= ARGV[1] then
  -- Readers blocked by this writer's intent may go now.
  redis.call('PUBLISH', ARGV[2], 'released')
  return 0
end
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', ARGV[2], 'released')
return 1
