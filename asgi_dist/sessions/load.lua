-- Load one session and refresh its idle timeout, in one round trip.
-- KEYS[1]  the session hash: metadata fields (created, access, uid, moved) beside
--          the user's fields, which are stored as "." .. key
-- ARGV[1]  idle timeout (ms)   ARGV[2] absolute timeout (ms)   ARGV[3] refresh interval (ms)
-- Returns false when the session does not exist, else the JSON text of
-- [pttl_ms, [field, value, field, value, ...]]: one bulk string is far cheaper for a
-- pure-Python client to parse than a nested array of many elements.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return false
end
local created, access, moved
for i = 1, #fields, 2 do
  local name = fields[i]
  if name == 'created' then created = tonumber(fields[i + 1])
  elseif name == 'access' then access = tonumber(fields[i + 1])
  elseif name == 'moved' then moved = true
  end
end
-- The server clock decides expiry, never the client's.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = (created or 0) + tonumber(ARGV[2]) - now
if left <= 0 then
  -- Past the absolute timeout: the TTL would end it within the idle window, end it now.
  redis.call('DEL', KEYS[1])
  return false
end
-- Refreshing the idle TTL at most every tenth of it keeps read-mostly traffic read-only.
-- A regenerated (moved) session keeps its short grace TTL.
if not moved and now - (access or 0) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'access', now)
  redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[1]), left))
end
return cjson.encode({redis.call('PTTL', KEYS[1]), fields})
