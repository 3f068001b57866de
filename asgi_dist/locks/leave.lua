-- A waiter that queued its process gave up (timeout, cancellation): take the
-- process out of the waiting set, and if a release already handed the lease to
-- this waiter, or woke its process, pass that on so that it is not lost with us.
-- KEYS as in release.lua (KEYS[4] optional)
-- ARGV[1] this process's origin tag   ARGV[2] wake-up channel prefix
-- ARGV[3] the leaving waiter's token
-- Returns 2 or 1 if it passed a lease or a wake-up on, else 0.
--! include hand_on
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[4] then
  redis.call('HDEL', KEYS[4], ARGV[1])
end
local holder = redis.call('HGET', KEYS[1], 'token')
if holder == ARGV[3] then
  redis.call('DEL', KEYS[1])  -- handed to us as we left: hand it on
elseif holder then
  return 0  -- held: its release serves the next waiter
end
return hand_on(ARGV[2], ARGV[1])
