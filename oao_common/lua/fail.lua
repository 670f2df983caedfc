-- fail.lua: a node attempt failed (fenced). Retry it later or fail it for good.
-- KEYS[1] the worker's active list   KEYS[2] the delayed set (zset of jobs by due time)
-- ARGV[2] worker id   ARGV[3] job   ARGV[4] fencing token   ARGV[5] error (JSON)
-- ARGV[6] retry delay in ms, or "-1" for a final failure
-- ARGV[7] node fields to set (JSON object of strings)
-- ARGV[8] buffered events (JSON array of [type, data_json])
-- Returns 2 when a retry was scheduled, 1 when failed for good, 3 when failed for good
-- and the failure (of a critical node) ended the run with other nodes in flight,
-- 0 when stale.
-- Idempotent: a retried call of the same attempt gets the first call's answer.
local wid, job, token = ARGV[2], ARGV[3], ARGV[4]
local closed = closed_result(job, token, 'fail')
if closed then return closed end
local rid, nid, nk, attempt = fence_or_reject(KEYS[1], job, wid, token, 'fail')
if not rid then return 0 end
flush(rid, nid, attempt, ARGV[8])
hset_fields(nk, cjson.decode(ARGV[7]))
redis.call('LREM', KEYS[1], 1, job)
leave_running(rid)
local delay = tonumber(ARGV[6])
if delay >= 0 then
  close_attempt(nk, token, 'fail', 2)
  local due = NOW + delay
  local n = redis.call('HINCRBY', nk, 'retries', 1)
  redis.call('HSET', nk, 'status', 'PENDING', 'retry_at', due, 'error', ARGV[5])
  redis.call('HDEL', nk, 'lease', 'fence')
  redis.call('ZADD', KEYS[2], due, job)
  emit(rid, 'NODE_RETRY_SCHEDULED', nid, attempt, cjson.encode({
    retry = n, delay_ms = delay, due_ms = due, error = cjson.decode(ARGV[5])}))
  return 2
end
local result = fail_node(rid, nid, attempt, ARGV[5]) and 3 or 1
close_attempt(nk, token, 'fail', result)
return result
