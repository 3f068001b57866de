-- Redlock: raise this server's fence counter to at least ARGV[1], so a later
-- majority (which shares a server with this one) grants a larger fence.
-- KEYS[1] fence counter   ARGV[1] the fence just granted
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
