-- Renew the run lease of a fire running on this node (server time).
-- XX: a fire already reaped as lost is not revived.
-- KEYS: 1 active runs zset; ARGV: 1 fire_id, 2 lease ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
