-- Create a session or apply one request's delta to it, in one round trip.
-- KEYS[1]  the session hash; KEYS[2], KEYS[3] (optional, standalone Redis only): the new
--          and the previous user's index sets, when the user id changed
-- ARGV[1]  "new" | "update"   ARGV[2] idle ms   ARGV[3] absolute ms
-- ARGV[4]  number of fields set (n)   ARGV[5] number of fields deleted (m)
-- ARGV[6]  "" user unchanged | "=" user cleared | "=<uid>" user set
-- ARGV[7]  invalidation channel ("" = no near cache)   ARGV[8] the session's handle
-- ARGV[9]  the invalidation message: the handle and the writer's tag, so that the
--          writer recognises its own echo
-- ARGV[10 .. 9+2n]  field, value pairs   then m field names to delete
-- Returns the session's new version (its count of writes, >= 1), or 0 when it is gone
-- (expired, deleted or regenerated meanwhile) or, for "new", already exists.
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle, absolute = tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl
if ARGV[1] == 'new' then
  if redis.call('EXISTS', key) == 1 then return 0 end
  redis.call('HSET', key, 'created', now, 'access', now)
  ttl = math.min(idle, absolute)
else
  local meta = redis.call('HMGET', key, 'created', 'moved')
  -- Never resurrect: a session that ended while this request ran stays ended.
  if not meta[1] or meta[2] then return 0 end
  local left = tonumber(meta[1]) + absolute - now
  if left <= 0 then
    redis.call('DEL', key)
    return 0
  end
  redis.call('HSET', key, 'access', now)
  ttl = math.min(idle, left)
end
-- Only the changed fields: a concurrent request's other fields stay intact.
local n, m = tonumber(ARGV[4]), tonumber(ARGV[5])
local i = 10
for _ = 1, n do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  i = i + 2
end
for _ = 1, m do
  redis.call('HDEL', key, ARGV[i])
  i = i + 1
end
local user = ARGV[6]
if user ~= '' then
  if user == '=' then
    redis.call('HDEL', key, 'uid')
  else
    redis.call('HSET', key, 'uid', string.sub(user, 2))
  end
  if #KEYS >= 3 then
    if KEYS[3] ~= key then redis.call('SREM', KEYS[3], ARGV[8]) end
    if KEYS[2] ~= key then
      redis.call('SADD', KEYS[2], ARGV[8])
      -- Every member ends within the absolute timeout of its creation.
      redis.call('PEXPIRE', KEYS[2], absolute)
    end
  end
end
redis.call('PEXPIRE', key, ttl)
if ARGV[7] ~= '' and ARGV[1] ~= 'new' then
  redis.call('PUBLISH', ARGV[7], ARGV[9])
end
-- The version lets a near cache tell that the cookie saw a newer write than its copy.
return redis.call('HINCRBY', key, 'ver', 1)
