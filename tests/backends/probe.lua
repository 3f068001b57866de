-- Increments a counter and records the key's slot owner: proves a script ran
-- atomically on the node that owns all of its keys.
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], n)
return n
