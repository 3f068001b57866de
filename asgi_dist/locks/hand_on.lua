-- Shared by release.lua and leave.lua (included): the lease is free and waiting
-- processes queue in KEYS[3]; hand it on to the one waiting longest.
-- KEYS[1] lease hash   KEYS[2] fence counter   KEYS[3] waiting processes (origin
-- tag -> time queued)   KEYS[4] optional: each waiting process's head waiter,
-- origin -> '<ttl ms>:<token>' (only that waiter attempts, see acquire.lua)
-- Returns 2 if the lease went to a waiter of another process, else 1 if a
-- process was woken to attempt, 0 if nobody waits.
local function hand_on(channel_prefix, skip)
  -- Bounded, like every script.  An entry whose process no longer listens (it
  -- left, or died) is dropped: PUBLISH counts the listeners.
  local queued = redis.call('ZRANGE', KEYS[3], 0, 31)
  for _, origin in ipairs(queued) do
    if origin ~= skip then
      local channel = channel_prefix .. ':' .. origin
      local head = KEYS[4] and redis.call('HGET', KEYS[4], origin)
      if head then
        -- Direct hand-off: the head waiter owns the lease when the message
        -- reaches it, with no round trip of its own and no newcomer barging in.
        -- The message names it by a digest of its token and carries the fence.
        local ttl, token = string.match(head, '^(%d+):(.*)$')
        local fence = redis.call('INCR', KEYS[2])
        if redis.call('PUBLISH', channel, 'to:' .. redis.sha1hex(token) .. ':' .. fence) > 0 then
          redis.call('HSET', KEYS[1], 'token', token, 'fence', fence)
          redis.call('PEXPIRE', KEYS[1], ttl)
          redis.call('ZREM', KEYS[3], origin)
          redis.call('HDEL', KEYS[4], origin)
          return 2
        end
      elseif redis.call('PUBLISH', channel, 'released') > 0 then
        -- Without a head (Redis Cluster, where PUBLISH counts only this node's
        -- listeners): woken, it attempts; it keeps its place until it acquires.
        return 1
      end
      redis.call('ZREM', KEYS[3], origin)
      if KEYS[4] then
        redis.call('HDEL', KEYS[4], origin)
      end
    end
  end
  return 0
end
