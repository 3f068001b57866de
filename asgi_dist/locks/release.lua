-- Release a lease only if this token still holds it, and hand it on or wake a waiter.
-- KEYS[1] lease hash   KEYS[2] fence counter (for a hand-off)
-- KEYS[3], KEYS[4] optional: waiting processes and their head waiters (see
-- hand_on.lua)
-- ARGV[1] token   ARGV[2] wake-up channel (with KEYS[3]: the prefix of each
-- process's own channel, '<prefix>:<origin>')
-- ARGV[3] the releasing process's origin tag (its own waiters were woken
-- directly and need no message)
-- ARGV[4], ARGV[5] optional: a waiter's token and ttl ms to hand the lease to
-- ARGV[6] '1' or '2': this process had its turn long enough; release to
-- everyone if another process waits ('2': where only KEYS[3] can tell)
-- ARGV[7] optional: how many fences to reserve with a hand-off to ARGV[4], for
-- the process to hand the lease on among its own waiters without a round trip
-- Returns 1 if released (free), 2 if handed to a waiter of another process,
-- {1, first fence, last fence} if handed to ARGV[4], 0 if the token no longer
-- held it (expired or taken).
--! include hand_on
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
local others = false
if ARGV[6] == '1' or ARGV[6] == '2' then
  if KEYS[3] then
    local queued = redis.call('ZCARD', KEYS[3])
    if redis.call('ZSCORE', KEYS[3], ARGV[3]) then
      queued = queued - 1
    end
    others = queued > 0
  elseif ARGV[6] == '2' then
    others = true
  else
    -- Subscribers of the shared channel: one connection per waiting process.
    others = redis.call('PUBSUB', 'NUMSUB', ARGV[2])[2] > 1
  end
end
if ARGV[4] and not others then
  -- Lock cohorting: a waiter of the same process gets the lease in this round
  -- trip (it needs none of its own); nobody else is woken, as it stays held.
  if KEYS[4] then
    -- If that waiter had queued this process, it is served: it waits no more.
    local head = redis.call('HGET', KEYS[4], ARGV[3])
    if head and string.match(head, '^%d+:(.*)$') == ARGV[4] then
      redis.call('HDEL', KEYS[4], ARGV[3])
      redis.call('ZREM', KEYS[3], ARGV[3])
    end
  end
  local last = redis.call('INCRBY', KEYS[2], tonumber(ARGV[7] or 1))
  local fence = last - tonumber(ARGV[7] or 1) + 1
  redis.call('HSET', KEYS[1], 'token', ARGV[4], 'fence', fence)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {1, fence, last}
end
redis.call('DEL', KEYS[1])
if not KEYS[3] then
  -- Waiters subscribed before their last attempt, so this cannot be missed.
  redis.call('PUBLISH', ARGV[2], 'released:' .. (ARGV[3] or ''))
  return 1
end
-- One process is served, the longest waiting, not all of them woken: the others
-- would only lose the race and go back to sleep (a thundering herd of round trips).
return hand_on(ARGV[2], ARGV[3]) == 2 and 2 or 1
