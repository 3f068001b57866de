-- End one session (logout), and the ids it was regenerated from.
-- KEYS[1] the session hash   KEYS[2] (optional, standalone Redis only) the user's index set
-- ARGV[1] channel ("" = none)   ARGV[2] the session's handle
-- ARGV[3] session key prefix ("<namespace>:session:")
-- Returns the handles ended: the session's, then its predecessors'.
local ended = {ARGV[2]}
local prev = redis.call('HGET', KEYS[1], 'prev')
redis.call('DEL', KEYS[1])
-- regenerate() left each predecessor readable, as the same user, for its grace period
-- (regenerate.lua): a logout must end them too.  A predecessor shares the shard, so
-- its key is in this slot.  The chain stops where a predecessor's grace is over; the
-- bound caps the script's work for a client that logs in in a loop.
for _ = 1, 100 do
  if not prev then break end
  local dot = string.find(prev, '.', 1, true)
  local key = '{' .. ARGV[3] .. string.sub(prev, 1, dot - 1) .. '}:' .. string.sub(prev, dot + 1)
  local meta = redis.call('HMGET', key, 'moved', 'prev')
  if not meta[1] then break end
  redis.call('DEL', key)
  table.insert(ended, prev)
  prev = meta[2]
end
for _, handle in ipairs(ended) do
  if #KEYS >= 2 then redis.call('SREM', KEYS[2], handle) end
  if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], handle) end
end
return ended
