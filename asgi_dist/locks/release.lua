-- Release a lease only if this token still holds it, and wake the waiters.
-- KEYS[1] lease hash   ARGV[1] token   ARGV[2] wake-up channel
-- ARGV[3] the releasing process's origin tag (its own waiters were woken
-- directly and ignore the echo; optional)
-- Returns 1 if released, 0 if the token no longer held it (expired or taken).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
-- Waiters subscribed before their last attempt, so this cannot be missed.
redis.call('PUBLISH', ARGV[2], 'released:' .. (ARGV[3] or ''))
return 1
