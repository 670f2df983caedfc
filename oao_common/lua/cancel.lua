-- cancel.lua: cancel a run: every node not yet terminal becomes CANCELLED.
-- Running attempts lose their fence, so their workers' next write is rejected;
-- queued jobs of cancelled nodes are dropped when claimed or promoted.
-- KEYS[1] run hash
-- ARGV[2] run id
-- Returns the number of nodes cancelled, or -1 if the run is unknown or already over.
local rid = ARGV[2]
local r = redis.call('HMGET', KEYS[1], 'status', 'node_ids')
if not r[1] or is_run_terminal(r[1]) then return -1 end
local n = cancel_nodes(rid)
redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', NOW)
emit(rid, 'RUN_CANCELLED', '', 0, cjson.encode({nodes_cancelled = n}))
announce_end(rid, 'CANCELLED')
return n
