-- Record as lost every fire whose node stopped renewing its run lease before the
-- fire finished (the node died or froze): a fire claimed by a leader that died
-- running it (or before handing it over), or one running on a node that died.
-- Such a fire is never started again (it may have had effects); history says what
-- happened instead.  Entries of fires that finished or were handed over are dropped.
-- KEYS: 1 history hash, 2 active runs zset; ARGV: 1 limit
-- Returns the fire ids recorded as lost.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local lost = {}
for _, id in ipairs(due) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    local rec = cjson.decode(raw)
    if rec['status'] == 'running' or rec['status'] == 'claimed' then
      rec['lost_at'] = now
      rec['error'] = 'node ' .. tostring(rec['node']) .. ' stopped renewing the run lease ' ..
        'of this ' .. rec['status'] .. ' fire (died or froze); the fire is not started again'
      rec['status'] = 'lost'
      redis.call('HSET', KEYS[1], id, cjson.encode(rec))
      lost[#lost + 1] = id
    end
  end
  redis.call('ZREM', KEYS[2], id)
end
return lost
