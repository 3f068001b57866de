-- List or end the sessions of one user, pruning dead index entries, in one round trip.
-- Standalone Redis only: the session keys are built here from the index members
-- (on Cluster they live in other slots and the manager walks them one by one).
-- KEYS[1] the user's index set
-- ARGV[1] "list" | "invalidate"   ARGV[2] key prefix ("<namespace>:session:")
-- ARGV[3] the user id   ARGV[4] channel ("" = none)
-- Returns {handle, created, access, ...} of the live sessions.
local out = {}
for _, handle in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local dot = string.find(handle, '.', 1, true)
  local key = '{' .. ARGV[2] .. string.sub(handle, 1, dot - 1) .. '}:' .. string.sub(handle, dot + 1)
  local meta = redis.call('HMGET', key, 'created', 'access', 'uid', 'moved')
  if not meta[1] or meta[3] ~= ARGV[3] then
    -- Expired, logged out or re-assigned: the index forgets it on this access.
    redis.call('SREM', KEYS[1], handle)
  elseif meta[4] then
    -- Regenerated: not listed, but its copy is still readable as this user for the
    -- grace period, so logging out everywhere ends it too.
    if ARGV[1] == 'invalidate' then
      redis.call('DEL', key)
      if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], handle) end
    end
  else
    table.insert(out, handle)
    table.insert(out, meta[1])
    table.insert(out, meta[2])
    if ARGV[1] == 'invalidate' then
      redis.call('DEL', key)
      if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], handle) end
    end
  end
end
if ARGV[1] == 'invalidate' then redis.call('DEL', KEYS[1]) end
return out
