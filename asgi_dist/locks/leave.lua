-- A process's last waiter for a lease gave up (timeout, cancellation): take the
-- process out of the waiting set, and if a release already woke it, pass the
-- wake-up on so that it is not lost with us.
-- KEYS[1] lease hash   KEYS[2] fence counter (unused)   KEYS[3] waiting processes
-- ARGV[1] this process's origin tag   ARGV[2] wake-up channel prefix
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0  -- held: its release will wake the next waiter
end
local queued = redis.call('ZRANGE', KEYS[3], 0, 31)
for _, origin in ipairs(queued) do
  if redis.call('PUBLISH', ARGV[2] .. ':' .. origin, 'released') > 0 then
    return 1
  end
  redis.call('ZREM', KEYS[3], origin)  -- nobody listens there any more
end
return 0
