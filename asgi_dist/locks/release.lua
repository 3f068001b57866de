-- Release a lease only if this token still holds it, and wake the waiters.
-- KEYS[1] lease hash   KEYS[2] fence counter (only for a hand-off)
-- ARGV[1] token   ARGV[2] wake-up channel
-- ARGV[3] the releasing process's origin tag (its own waiters were woken
-- directly and ignore the echo; optional)
-- ARGV[4], ARGV[5] optional: a waiter's token and ttl ms to hand the lease to
-- ARGV[6] '1': this process had its turn long enough; release to everyone if
-- anyone else may be waiting ('2': always, where the count below is partial)
-- Returns 1 if released, {1, fence} if handed on, 0 if the token no longer
-- held it (expired or taken).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
local others = ARGV[6] == '2'
if ARGV[6] == '1' then
  -- Subscribers of the wake-up channel: one connection per waiting process
  -- (ours among them); exact on a single server, not on a cluster.
  others = redis.call('PUBSUB', 'NUMSUB', ARGV[2])[2] > 1
end
if ARGV[4] and not others then
  -- Lock cohorting: a waiter of the same process gets the lease in this round
  -- trip (it needs none of its own); nobody else is woken, as it stays held.
  local fence = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'token', ARGV[4], 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {1, fence}
end
redis.call('DEL', KEYS[1])
-- Waiters subscribed before their last attempt, so this cannot be missed.
redis.call('PUBLISH', ARGV[2], 'released:' .. (ARGV[3] or ''))
return 1
