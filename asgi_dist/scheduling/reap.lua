-- Record as lost every fire whose node stopped renewing its run lease before the
-- fire finished (the node died or froze): a fire claimed by a leader that died
-- running it (or before handing it over), or one running on a node that died.
-- Such a fire is never started again (it may have had effects); history says what
-- happened instead.  Entries of fires that finished or were handed over are dropped.
-- A broadcast fire handed to its members ('dispatched', with members) stays until it
-- settles: a shard whose member is no longer live (its membership heartbeat lapsed:
-- it died, froze or left) before reporting is recorded lost, and a shard that its
-- live member did not start within the run lease (it never read the entry) is
-- recorded abandoned; start_shard.lua and finish.lua then leave it so.
-- KEYS: 1 history hash, 2 active runs zset
-- ARGV: 1 limit, 2 live members as a JSON array ('' = unknown: broadcasts wait)
-- Returns the fire ids recorded (or, for a broadcast, settled) as lost.
--! include settle
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = nil
if ARGV[2] ~= '' then
  live = {}
  for _, member in ipairs(cjson.decode(ARGV[2])) do live[member] = true end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local lost = {}
for _, id in ipairs(due) do
  local raw = redis.call('HGET', KEYS[1], id)
  local keep = false
  if raw then
    local rec = cjson.decode(raw)
    if rec['status'] == 'running' or rec['status'] == 'claimed' then
      rec['lost_at'] = now
      rec['error'] = 'node ' .. tostring(rec['node']) .. ' stopped renewing the run lease ' ..
        'of this ' .. rec['status'] .. ' fire (died or froze); the fire is not started again'
      rec['status'] = 'lost'
      redis.call('HSET', KEYS[1], id, cjson.encode(rec))
      lost[#lost + 1] = id
    elseif rec['status'] == 'dispatched' and type(rec['members']) == 'table' then
      keep = true
      if live then
        if type(rec['shards']) ~= 'table' then rec['shards'] = {} end
        for i, member in ipairs(rec['members']) do
          local index = tostring(i - 1)
          local shard = rec['shards'][index]
          if not live[member] and (not shard or shard['status'] == 'running') then
            rec['shards'][index] = {status = 'lost', node = member, lost_at = now,
              error = 'member ' .. member .. ' stopped its membership heartbeat (died, froze ' ..
                'or left) before its shard reported; the shard is not started again'}
          elseif not shard then
            rec['shards'][index] = {status = 'abandoned', node = member,
              error = 'member ' .. member .. ' did not start its shard within the run lease'}
          end
        end
        if settle(rec, #rec['members']) then
          keep = false
          if rec['status'] == 'lost' then lost[#lost + 1] = id end
        end
        redis.call('HSET', KEYS[1], id, cjson.encode(rec))
      end
    end
  end
  if keep then
    redis.call('ZADD', KEYS[2], now, id)  -- behind the other due entries: none starves
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return lost
