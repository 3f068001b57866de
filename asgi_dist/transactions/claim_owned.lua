-- Re-claim pending entries that this consumer still owns, setting their idle time.
-- idle 0 is a heartbeat (the entry is being handled: nobody may reclaim it);
-- idle = reclaim_after - backoff schedules a retry after `backoff` by any consumer.
-- An entry that another consumer took over is left alone (not stolen back).
-- KEYS[1] stream; ARGV: group, consumer, idle_ms, id...
-- Returns the ids still owned.
local owned = {}
for i = 4, #ARGV do
    local id = ARGV[i]
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if p[1] and p[1][2] == ARGV[2] then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
        owned[#owned + 1] = id
    end
end
return owned
