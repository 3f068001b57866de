-- Membership for broadcast jobs: refresh this node's heartbeat (server time)
-- and drop nodes silent for longer than the ttl; returns the live nodes.
-- KEYS: 1 members zset; ARGV: 1 node id, 2 ttl ms, 3 '1' to leave instead
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
elseif ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
