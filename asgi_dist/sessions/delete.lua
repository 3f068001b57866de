-- End one session (logout).
-- KEYS[1] the session hash   KEYS[2] (optional, standalone Redis only) the user's index set
-- ARGV[1] channel ("" = none)   ARGV[2] the session's handle
redis.call('DEL', KEYS[1])
if #KEYS >= 2 then redis.call('SREM', KEYS[2], ARGV[2]) end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
