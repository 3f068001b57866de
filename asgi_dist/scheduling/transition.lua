-- Move a handed-over fire's history record to a new status only while it still
-- has one of the expected ones: the compare-and-set behind "at most one start"
-- when a fire is delivered more than once.  Only one receiver moves it from
-- claimed/dispatched to running; a redelivered copy, or a node that wakes from
-- a pause, finds it running and starts nothing.
-- KEYS: 1 history hash, 2 active runs (zset: fire_id -> run lease expiry, server ms)
-- ARGV: 1 fire_id, 2 expected statuses (comma-separated), 3 new status,
--       4 node ('' = keep), 5 run lease ms ('' = not a start), 6 error ('' = keep),
--       7 delivery number of a start ('' = keep)
-- Returns {moved ('1' | '0'), the status before}.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {'0', 'missing'} end
local rec = cjson.decode(raw)
local status = tostring(rec['status'])
if not string.find(',' .. ARGV[2] .. ',', ',' .. status .. ',', 1, true) then
  return {'0', status}
end
rec['status'] = ARGV[3]
if ARGV[4] ~= '' then rec['node'] = ARGV[4] end
if ARGV[6] ~= '' then rec['error'] = ARGV[6] end
if ARGV[7] ~= '' then rec['delivery'] = tonumber(ARGV[7]) end
if ARGV[5] ~= '' then
  -- A start: record when (server time) and open the run lease the node renews;
  -- if it stops renewing, reap.lua records the fire as lost.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  rec['started_at'] = now
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return {'1', status}
