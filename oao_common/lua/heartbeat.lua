-- heartbeat.lua: a worker's heartbeat, on the server's clock.
-- KEYS[1] the worker's heartbeat key   KEYS[2] workers index (zset)   KEYS[3] info hash
-- ARGV[2] worker id   ARGV[3] time to live in ms   ARGV[4] info fields (JSON object of
-- strings, '{}' for none)
-- The heartbeat key holds the server time of the beat and expires after the TTL: the
-- reaper treats a worker whose key is gone as dead. The index score is the server
-- time in seconds, so workers with skewed clocks are judged alike.
-- Returns 1 if the previous heartbeat was still alive, 0 if it had expired (the worker
-- may have been reaped and must check its leases).
local prev = redis.call('SET', KEYS[1], NOW, 'PX', tonumber(ARGV[3]), 'GET')
redis.call('ZADD', KEYS[2], NOW / 1000, ARGV[2])
hset_fields(KEYS[3], cjson.decode(ARGV[4]))
if prev then return 1 end
return 0
