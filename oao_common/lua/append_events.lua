-- append_events.lua: write a node's buffered events (fenced), e.g. before a long model
-- call, so the log shows STATE_ENTER / STEP_REPLAYED while the call runs.
-- KEYS[1] the worker's active list
-- ARGV[2] worker id   ARGV[3] job   ARGV[4] fencing token (claim.lua)
-- ARGV[5] buffered events (JSON array of [type, data_json])
-- Returns 1 when written, 0 when the attempt is stale (nothing written).
local wid, job, token = ARGV[2], ARGV[3], ARGV[4]
local rid, nid, _, attempt = fence_or_reject(KEYS[1], job, wid, token, 'append_events')
if not rid then return 0 end
flush(rid, nid, attempt, ARGV[5])
return 1
