-- Load a job's state, starting its fire sequence if it is new or its schedule changed.
-- KEYS: 1 state hash; ARGV: 1 signature, 2 first next fire ms ('none' if the schedule is over)
if redis.call('HGET', KEYS[1], 'sig') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'sig', ARGV[1], 'next', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'next', 'paused', 'fence')
