-- Forget a one-off's name in the index of names with runs (store_redis.py), unless a
-- claim tracked it again since the leader read it: each tracking writes a new random
-- score, so the compare-and-delete cannot drop a name whose new run the leader has
-- not seen yet.
-- KEYS: 1 index zset (name -> random score); ARGV: 1 name, 2 the score read
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
