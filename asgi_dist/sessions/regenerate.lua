-- Move a session to a new id in one atomic step (login: fixation defence).
-- KEYS[1] old hash   KEYS[2] new hash (same shard, so the same Cluster slot)
-- KEYS[3] (optional, standalone Redis only) the user's index set
-- ARGV[1] grace ms   ARGV[2] idle ms   ARGV[3] absolute ms   ARGV[4] channel ("" = none)
-- ARGV[5] old handle   ARGV[6] new handle
-- Returns 1 moved, 0 the old session is gone (or already moved).
local old, new = KEYS[1], KEYS[2]
local meta = redis.call('HMGET', old, 'created', 'moved')
if not meta[1] or meta[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(meta[1]) + tonumber(ARGV[3]) - now
if left <= 0 then
  redis.call('DEL', old)
  return 0
end
redis.call('COPY', old, new, 'REPLACE')
-- The new id keeps the creation time: regenerating never extends the absolute timeout.
-- It names its predecessor, so that a logout ends that readable copy too (delete.lua).
redis.call('HSET', new, 'access', now, 'prev', ARGV[5])
redis.call('PEXPIRE', new, math.min(tonumber(ARGV[2]), left))
-- The old id stays readable, read-only, for the grace period, then it is gone.
local grace = tonumber(ARGV[1])
if grace > 0 then
  redis.call('HSET', old, 'moved', '1')
  if redis.call('PTTL', old) > grace then redis.call('PEXPIRE', old, grace) end
else
  redis.call('DEL', old)
end
if #KEYS >= 3 then
  -- The old handle stays indexed while its copy is readable (and carries the user):
  -- invalidate_user must end that copy too.  The index forgets it once it is gone.
  redis.call('SADD', KEYS[3], ARGV[6])
end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
