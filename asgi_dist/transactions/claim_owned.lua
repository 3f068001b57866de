-- Re-claim pending entries that this consumer still owns, setting their idle time.
-- idle 0 is a heartbeat (the entry is being handled: nobody may reclaim it);
-- idle = reclaim_after - backoff schedules a retry after `backoff` by any consumer.
-- An entry that another consumer took over is left alone (not stolen back).
-- KEYS[1] stream; ARGV: group, consumer, idle_ms, id...
-- Returns one code per id: 1 still ours (re-claimed), 0 no longer pending (acked),
-- -1 taken over by another consumer.
local codes = {}
for i = 4, #ARGV do
    local id = ARGV[i]
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if not p[1] then
        codes[#codes + 1] = 0
    elseif p[1][2] == ARGV[2] then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
        codes[#codes + 1] = 1
    else
        codes[#codes + 1] = -1
    end
end
return codes
