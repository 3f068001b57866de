-- Update the history record of a fire, and release its running lease if it is still ours.
-- KEYS: 1 history hash, 2 running lease
-- ARGV: 1 fire_id, 2 patch JSON, 3 release ('1' | '0')
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local rec = cjson.decode(raw)
  for k, v in pairs(cjson.decode(ARGV[2])) do rec[k] = v end
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
end
if ARGV[3] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return raw and 1 or 0
