-- Update the history record of a fire, and release its running lease if it is still ours.
-- A fire recorded lost stays lost: its node lost the run lease (see alive.lua), so
-- whatever that node did afterwards is not the fire's outcome.
-- One shard of a broadcast writes its outcome under shards[index]; once every shard
-- has reported, the fire gets its own status: succeeded if every shard succeeded,
-- else failed if any failed, else the status of the lowest shard that did not succeed.
-- KEYS: 1 history hash, 2 running lease
-- ARGV: 1 fire_id, 2 patch JSON, 3 release ('1' | '0'), 4 shard index ('' = not a shard),
--       5 shard total
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local written = 0
if raw then
  local rec = cjson.decode(raw)
  if rec['status'] ~= 'lost' then
    local patch = cjson.decode(ARGV[2])
    if ARGV[4] == '' then
      for k, v in pairs(patch) do rec[k] = v end
    else
      if type(rec['shards']) ~= 'table' then rec['shards'] = {} end
      rec['shards'][ARGV[4]] = patch
      local total = tonumber(ARGV[5])
      local reported, attempt, failed, worst = 0, 0, nil, nil
      for i = 0, total - 1 do
        local shard = rec['shards'][tostring(i)]
        if shard then
          reported = reported + 1
          if tonumber(shard['attempt']) and shard['attempt'] > attempt then attempt = shard['attempt'] end
          if shard['status'] ~= 'succeeded' then
            if shard['status'] == 'failed' and not failed then failed = i end
            if not worst then worst = i end
          end
        end
      end
      rec['shard_total'] = total
      if reported == total then
        local pick = failed or worst
        rec['attempt'] = attempt
        if pick then
          local shard = rec['shards'][tostring(pick)]
          local why = shard['error']
          if why == nil or why == cjson.null then why = shard['status'] end
          rec['status'] = shard['status']
          rec['error'] = 'shard ' .. pick .. ' of ' .. total .. ': ' .. tostring(why)
        else
          rec['status'] = 'succeeded'
          rec['error'] = cjson.null
        end
      end
    end
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
    written = 1
  end
end
if ARGV[3] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return written
