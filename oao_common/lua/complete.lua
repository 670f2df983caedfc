-- complete.lua: finish a node successfully (fenced) and release its dependents.
-- KEYS[1] the worker's active list
-- ARGV[2] worker id   ARGV[3] job   ARGV[4] fencing token   ARGV[5] output (JSON)
-- ARGV[6] node fields to set (JSON object of strings: steps, replayed_steps, ...)
-- ARGV[7] buffered events (JSON array of [type, data_json])
-- Returns 1 when completed, 0 when the attempt is stale (nothing written but the
-- STALE_ATTEMPT_REJECTED event). Idempotent: a retried call of the same attempt (after
-- a lost reply) gets the first call's answer and writes nothing.
local wid, job, token = ARGV[2], ARGV[3], ARGV[4]
local closed = closed_result(job, token, 'complete')
if closed then return closed end
local rid, nid, nk, attempt = fence_or_reject(KEYS[1], job, wid, token, 'complete')
if not rid then return 0 end
flush(rid, nid, attempt, ARGV[7])
hset_fields(nk, cjson.decode(ARGV[6]), 'status', 'SUCCEEDED', 'output', ARGV[5], 'finished_at', NOW)
close_attempt(nk, token, 'complete', 1)
redis.call('HDEL', nk, 'lease', 'fence', 'error', 'retry_at')
emit(rid, 'NODE_SUCCEEDED', nid, attempt, '{}')
redis.call('LREM', KEYS[1], 1, job)
leave_running(rid)
release_dependents(rid, nid)
redis.call('HINCRBY', run_key(rid), 'nodes_done', 1)
redis.call('HINCRBY', run_key(rid), 'nodes_succeeded', 1)
finish_run_if_done(rid)
return 1
