-- Create a session or apply one request's delta to it, in one round trip.
-- KEYS[1]  the session hash; KEYS[2], KEYS[3] (optional, standalone Redis only): the new
--          and the previous user's index sets, when the user id changed
-- ARGV[1]  the request as one JSON array (one argument is far cheaper for the client to
--          pack than dozens):
--          [mode "new"|"update", idle ms, absolute ms, user, channel, handle, message,
--           [field, value, field, value, ...], [deleted field, ...], max size,
--           session key prefix ("<namespace>:session:")]
--          user: "" unchanged | "=" cleared | "=<uid>" set; channel: "" = no near cache;
--          message: the handle and the writer's tag, so the writer knows its own echo
-- Returns the session's new version (its count of writes, >= 1), 0 when it is gone
-- (expired, deleted or regenerated meanwhile) or, for "new", already exists, or -1,
-- changing nothing, when the update would make the session larger than max size
-- (concurrent requests that each grew it): keys plus values, as the client counts them.
local req = cjson.decode(ARGV[1])
local mode, idle, absolute = req[1], req[2], req[3]
local user, channel, handle, message, pairs_, deleted = req[4], req[5], req[6], req[7], req[8], req[9]
local max_size, prefix = req[10], req[11]
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl
if mode == 'new' then
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
  -- The size after this update (only one that sets something can grow it): the stored
  -- fields less those deleted or replaced, plus the new values; user fields are
  -- "." .. key, and the dot does not count.
  if #pairs_ > 0 then
    local changed = {}
    local size = 0
    for i = 1, #pairs_, 2 do
      changed[pairs_[i]] = true
      size = size + #pairs_[i] - 1 + #pairs_[i + 1]
    end
    for i = 1, #deleted do
      changed[deleted[i]] = true
    end
    local stored = redis.call('HGETALL', key)
    for i = 1, #stored, 2 do
      local name = stored[i]
      if string.sub(name, 1, 1) == '.' and not changed[name] then
        size = size + #name - 1 + #stored[i + 1]
      end
    end
    if size > max_size then return -1 end
  end
  redis.call('HSET', key, 'access', now)
  ttl = math.min(idle, left)
end
-- Only the changed fields: a concurrent request's other fields stay intact.
for i = 1, #pairs_, 2 do
  redis.call('HSET', key, pairs_[i], pairs_[i + 1])
end
for i = 1, #deleted do
  redis.call('HDEL', key, deleted[i])
end
if user ~= '' then
  if user == '=' then
    redis.call('HDEL', key, 'uid')
  else
    redis.call('HSET', key, 'uid', string.sub(user, 2))
  end
  if #KEYS >= 3 then
    if KEYS[3] ~= key then redis.call('SREM', KEYS[3], handle) end
    if KEYS[2] ~= key then
      redis.call('SADD', KEYS[2], handle)
      -- Every member ends within the absolute timeout of its creation.
      redis.call('PEXPIRE', KEYS[2], absolute)
      -- A user who keeps logging in would keep the index alive, and with it every
      -- ended session's entry: past a few members, each login forgets some dead ones
      -- (as list_user does), so the index stays about as large as the live sessions.
      if redis.call('SCARD', KEYS[2]) > 16 then
        local uid = string.sub(user, 2)
        for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[2], 8)) do
          local dot = string.find(member, '.', 1, true)
          if dot then
            local other = '{' .. prefix .. string.sub(member, 1, dot - 1) .. '}:' ..
              string.sub(member, dot + 1)
            -- A regenerated copy stays until it is gone: invalidate_user ends it.
            if redis.call('HGET', other, 'uid') ~= uid then redis.call('SREM', KEYS[2], member) end
          end
        end
      end
    end
  end
end
redis.call('PEXPIRE', key, ttl)
if channel ~= '' and mode ~= 'new' then
  redis.call('PUBLISH', channel, message)
end
-- The version lets a near cache tell that the cookie saw a newer write than its copy.
return redis.call('HINCRBY', key, 'ver', 1)
