-- Load a job's state, starting its fire sequence if it is new or its schedule changed.
-- KEYS: 1 state hash; ARGV: 1 signature, 2 first next fire ms ('none' if the schedule is over)
-- A registered job's state is kept for good, even under a name one-offs used before
-- (claim.lua let it expire then).
if redis.call('HDEL', KEYS[1], 'retain') == 1 then redis.call('PERSIST', KEYS[1]) end
if redis.call('HGET', KEYS[1], 'sig') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'sig', ARGV[1], 'next', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'next', 'paused', 'fence')
