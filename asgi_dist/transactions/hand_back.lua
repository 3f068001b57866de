-- Give back entries a stopping consumer abandoned (it cancelled their handlers before
-- an outcome, so their transactions rolled back): claimable by any member at once, and
-- the abandoned delivery uncounted, so a graceful stop (a deploy) neither delays them
-- by reclaim_after nor spends one of their max_deliveries.
-- KEYS[1] stream; ARGV: group, consumer, idle_ms, id...
-- Returns how many entries were handed back (one another consumer took is left alone).
local handed = 0
for i = 4, #ARGV do
    local id = ARGV[i]
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if p[1] and p[1][2] == ARGV[2] then
        -- RETRYCOUNT sets the delivery counter; the next XAUTOCLAIM adds this delivery back.
        local count = math.max(p[1][4] - 1, 0)
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id,
                   'IDLE', ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
        handed = handed + 1
    end
end
return handed
