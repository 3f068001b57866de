-- Extend a lease only if this token still holds it.
-- KEYS[1] lease hash   ARGV[1] token   ARGV[2] new ttl in ms
-- Returns 1 if extended, 0 if the lease was lost (expired or taken over).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
