-- Delete consumers of the run_on="any" group that hold no pending entries and were
-- idle for long: every process start joins under a new node id, and dead names
-- would pile up forever.  Atomic, so that a consumer cannot receive an entry between
-- the check and the delete (deleting a consumer drops its pending entries).  A live
-- consumer deleted here is recreated by its next XREADGROUP.  (The transactions
-- consumer groups prune the same way.)
-- KEYS: 1 stream; ARGV: 1 group, 2 min idle ms, 3 the caller's own name
-- Returns how many consumers were deleted.
local deleted = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    deleted = deleted + 1
  end
end
return deleted
