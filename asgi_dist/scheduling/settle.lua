-- Shared by finish.lua and reap.lua (included): a broadcast fire's record takes its
-- own status once every shard has its final outcome under shards[index] (a shard
-- its member started is 'running' until then): succeeded if every shard succeeded,
-- else failed if any failed, else the status of the lowest shard that did not
-- succeed, named in error.  store.settle_shard does the same in Python.
-- Returns true once the fire is settled.
local function settle(rec, total)
  if type(rec['shards']) ~= 'table' then rec['shards'] = {} end
  rec['shard_total'] = total
  local reported, attempt, failed, worst = 0, 0, nil, nil
  for i = 0, total - 1 do
    local shard = rec['shards'][tostring(i)]
    if shard and shard['status'] ~= 'running' then
      reported = reported + 1
      if tonumber(shard['attempt']) and shard['attempt'] > attempt then attempt = shard['attempt'] end
      if shard['status'] ~= 'succeeded' then
        if shard['status'] == 'failed' and not failed then failed = i end
        if not worst then worst = i end
      end
    end
  end
  if reported < total then return false end
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
  return true
end
