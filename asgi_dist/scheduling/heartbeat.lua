-- Membership for broadcast jobs, kept with server time.
-- A node refreshes its own heartbeat (two commands: the beat every node sends);
-- the leader, asking with an empty node id, drops nodes silent for longer than
-- the ttl and gets the live ones.
-- KEYS: 1 members zset; ARGV: 1 node id ('' = list), 2 ttl ms, 3 '1' to leave instead
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  return {}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
