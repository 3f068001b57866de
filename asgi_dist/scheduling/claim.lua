-- Claim one fire of one job: the single step that makes "at most one start per
-- fire" true.  Every key shares the job's hash tag, so this runs atomically on
-- one Redis (Cluster) slot.
-- KEYS: 1 state hash, 2 claim key of this fire, 3 running lease, 4 history hash, 5 history index,
--       6 active runs (zset: fire_id -> run lease expiry, server ms; see reap.lua)
-- ARGV: 1 fire_ms, 2 fire_id, 3 expected next ('' = no check: triggers, one-offs),
--       4 new next ('' = keep, 'none' = schedule ended), 5 fence, 6 intent ('run' | 'missed'),
--       7 record JSON, 8 overlap, 9 running lease ms, 10 claim ttl ms, 11 history cap, 12 signature,
--       13 retention ms of a one-off's name no job is registered under ('0' = kept for good)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence = tonumber(ARGV[5])
-- A leader from an older term (paused, partitioned) may still think it leads:
-- once a newer term has claimed anything for this job, the old one is refused.
local seen = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if fence < seen then return {'stale', tostring(seen)} end
-- A newer deployment changed the schedule; its fire sequence wins.
if ARGV[12] ~= '' and redis.call('HGET', KEYS[1], 'sig') ~= ARGV[12] then
  return {'moved', redis.call('HGET', KEYS[1], 'next') or ''}
end
-- Server time decides when a fire is due, never the client clock.
if tonumber(ARGV[1]) > now then return {'early', tostring(tonumber(ARGV[1]) - now)} end
-- Compare-and-set on the next fire: each fire is taken from the sequence once.
if ARGV[3] ~= '' then
  local nxt = redis.call('HGET', KEYS[1], 'next')
  if nxt ~= ARGV[3] then return {'moved', nxt or ''} end
end
-- The claim key outlives the period plus clock skew, for fires outside the sequence.
if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[10]) then
  -- Taken already (the sequence was restarted over it): move past it.
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'next', ARGV[4]) end
  return {'duplicate', ''}
end
redis.call('HSET', KEYS[1], 'fence', ARGV[5])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'next', ARGV[4]) end
local status = 'claimed'
if ARGV[6] ~= 'run' then
  status = ARGV[6]
elseif redis.call('HGET', KEYS[1], 'paused') == '1' then
  status = 'paused'
elseif ARGV[8] == 'forbid' then
  if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[9]) then status = 'skipped' end
elseif ARGV[8] == 'replace' then
  -- The previous run sees the lease is no longer its own and cancels itself.
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[9])
end
local rec = cjson.decode(ARGV[7])
rec['status'] = status
rec['claimed_at'] = now
if status == 'skipped' then rec['error'] = 'overlap=forbid: the previous run is still running' end
if status == 'paused' then rec['error'] = 'the job is paused' end
redis.call('HSET', KEYS[4], ARGV[2], cjson.encode(rec))
-- A claimed fire holds a run lease that its runner renews; if the runner's node
-- dies first, the leader records the fire as lost (it is never claimed again).
if status == 'claimed' then redis.call('ZADD', KEYS[6], now + tonumber(ARGV[9]), ARGV[2]) end
redis.call('ZADD', KEYS[5], ARGV[1], ARGV[2])
-- A one-off's name (at() names may be countless): its keys expire the retention after
-- the run lease, which alive.lua extends while a run lasts, so they go once its last
-- run ended that long ago.  A job's own claim keeps them for good.
local retain = tonumber(ARGV[13])
local named = {KEYS[1], KEYS[4], KEYS[5], KEYS[6]}
if retain > 0 then
  redis.call('HSET', KEYS[1], 'retain', ARGV[13])
  for _, key in ipairs(named) do redis.call('PEXPIRE', key, tonumber(ARGV[9]) + retain) end
elseif redis.call('HDEL', KEYS[1], 'retain') == 1 then
  for _, key in ipairs(named) do redis.call('PERSIST', key) end
end
local n = redis.call('ZCARD', KEYS[5])
local cap = tonumber(ARGV[11])
if n > cap then
  local old = redis.call('ZRANGE', KEYS[5], 0, n - cap - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, n - cap - 1)
  redis.call('HDEL', KEYS[4], unpack(old))
end
return {status, tostring(now)}
