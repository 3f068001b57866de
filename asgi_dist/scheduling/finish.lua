-- Update the history record of a fire, and release its running lease if it is still ours.
-- A fire recorded lost stays lost: its node lost the run lease (see alive.lua), so
-- whatever that node did afterwards is not the fire's outcome.
-- One shard of a broadcast writes its outcome under shards[index], once: a shard
-- already recorded (e.g. lost by reap.lua when its member's heartbeat lapsed) keeps
-- that outcome.  Once every shard has one, the fire settles (settle.lua).
-- KEYS: 1 history hash, 2 running lease
-- ARGV: 1 fire_id, 2 patch JSON, 3 release ('1' | '0'), 4 shard index ('' = not a shard),
--       5 shard total
--! include settle
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local written = 0
if raw then
  local rec = cjson.decode(raw)
  if rec['status'] ~= 'lost' then
    local patch = cjson.decode(ARGV[2])
    if ARGV[4] == '' then
      for k, v in pairs(patch) do rec[k] = v end
      written = 1
    else
      if type(rec['shards']) ~= 'table' then rec['shards'] = {} end
      local before = rec['shards'][ARGV[4]]
      if not before or before['status'] == 'running' then
        rec['shards'][ARGV[4]] = patch
        settle(rec, tonumber(ARGV[5]))
        written = 1
      end
    end
    if written == 1 then redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec)) end
  end
end
if ARGV[3] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return written
