-- Extend the running lease only while it still names this fire (overlap=replace
-- hands it to a newer fire, whose runner then owns the job).
-- KEYS: 1 running lease; ARGV: 1 fire_id, 2 lease ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
