-- The run lease of a fire this node runs: renew it and, before an attempt, also
-- mark the fire running.  One step, so that no attempt starts on a lease that lapsed:
-- "a fire that was claimed or reached running is never started again".
-- A lapsed lease means the node froze or lost the server for longer than the lease:
-- the fire is recorded lost here (as reap.lua would a moment later) and the node
-- must not go on; one already reaped is gone from the zset and is not revived.
-- A one-off's name kept for a retention (claim.lua) is kept that long after this lease.
-- KEYS: 1 history hash, 2 active runs zset (fire_id -> run lease expiry, server ms),
--       3 state hash, 4 history index
-- ARGV: 1 fire_id, 2 lease ms, 3 attempt about to start ('' = renew only), 4 node
-- Returns 1 if this node may go on running the fire, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expiry then return 0 end
-- The record may be gone (trimmed by the history cap): the lease alone then decides.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local rec = raw and cjson.decode(raw)
local status = rec and rec['status']
if rec and status ~= 'claimed' and status ~= 'running' then return 0 end
if tonumber(expiry) <= now then
  if rec then
    rec['lost_at'] = now
    rec['error'] = 'node ' .. tostring(rec['node']) .. ' stopped renewing the run lease ' ..
      'of this ' .. status .. ' fire (died or froze); the fire is not started again'
    rec['status'] = 'lost'
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
  end
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local retain = tonumber(redis.call('HGET', KEYS[3], 'retain') or '0')
if retain > 0 then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, tonumber(ARGV[2]) + retain) end
end
if rec and ARGV[3] ~= '' then
  if status ~= 'running' then rec['started_at'] = now end
  rec['status'] = 'running'
  rec['attempt'] = tonumber(ARGV[3])
  rec['node'] = ARGV[4]
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
end
return 1
