-- Move one pending entry to the group's dead-letter stream and ack it, atomically:
-- a crash can neither lose the message nor leave it both pending and dead.
-- KEYS[1] stream, KEYS[2] dead-letter stream (same hash tag)
-- ARGV: group, id, error, deliveries, consumer
-- Returns the dead-letter entry id, or false if the entry was trimmed away.
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entry == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
    return false
end
local fields = entry[1][2]
fields[#fields + 1] = 'error'
fields[#fields + 1] = ARGV[3]
fields[#fields + 1] = 'deliveries'
fields[#fields + 1] = ARGV[4]
fields[#fields + 1] = 'group'
fields[#fields + 1] = ARGV[1]
fields[#fields + 1] = 'consumer'
fields[#fields + 1] = ARGV[5]
fields[#fields + 1] = 'stream_id'
fields[#fields + 1] = ARGV[2]
local dead = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return dead
