-- A member starts its shard of a broadcast fire: the compare-and-set behind "each
-- shard starts at most once, and never after it was recorded lost or abandoned"
-- (reap.lua records a shard whose member's heartbeat lapsed, or that its live
-- member did not start within the run lease; a member that wakes from a freeze, or
-- reads the entry late, must then start nothing).
-- KEYS: 1 history hash; ARGV: 1 fire_id, 2 shard index, 3 node
-- Returns 'running' if this member must run the shard, else what stopped it.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 'missing' end
local rec = cjson.decode(raw)
if rec['status'] ~= 'dispatched' then return tostring(rec['status']) end
if type(rec['shards']) ~= 'table' then rec['shards'] = {} end
local shard = rec['shards'][ARGV[2]]
if shard then return 'shard ' .. tostring(shard['status']) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
rec['shards'][ARGV[2]] = {status = 'running', node = ARGV[3], started_at = now}
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return 'running'
