-- append_events.lua: write a node's buffered events (fenced), e.g. before a long model
-- call, so the log shows STATE_ENTER / STEP_REPLAYED while the call runs.
-- KEYS[1] the worker's active list
-- ARGV[6] worker id   ARGV[7] job   ARGV[8] attempt
-- ARGV[9] buffered events (JSON array of [type, data_json])
-- Returns 1 when written, 0 when the attempt is stale (nothing written).
local wid, job, attempt = ARGV[6], ARGV[7], ARGV[8]
local rid, nid = split_job(job)
local ok, s = fenced(node_key(rid, nid), wid, attempt)
if not ok then
  reject_stale(KEYS[1], job, rid, nid, wid, attempt, s, 'append_events')
  return 0
end
flush(rid, nid, attempt, ARGV[9])
return 1
