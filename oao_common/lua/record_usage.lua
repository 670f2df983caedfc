-- record_usage.lua: add what a failed model call consumed (a stream cut off or stopped
-- by a budget after the model had started answering) to the node's and the run's usage
-- and cost (fenced). No ledger record: the call has no result to replay.
-- KEYS[1] the worker's active list
-- ARGV[2] worker id   ARGV[3] job   ARGV[4] fencing token   ARGV[5] call id ("<seq>.<try>",
--         unique within the attempt: a re-sent call adds nothing twice)
-- ARGV[6] input tokens   ARGV[7] output tokens   ARGV[8] cost in USD
-- ARGV[9] buffered events (JSON array of [type, data_json])
-- The node hash keeps 'spent:<fence>:<call id>' = '<in> <out> <usd>' per call.
-- Returns 1 when recorded (or already recorded), 0 when the attempt is stale.
local wid, job, token = ARGV[2], ARGV[3], ARGV[4]
local rid, nid, nk, attempt = fence_or_reject(KEYS[1], job, wid, token, 'record_usage')
if not rid then return 0 end
local field = 'spent:' .. token .. ':' .. ARGV[5]
if redis.call('HSETNX', nk, field, ARGV[6] .. ' ' .. ARGV[7] .. ' ' .. ARGV[8]) == 0 then return 1 end
local tin, tout, cost = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local rk = run_key(rid)
redis.call('HINCRBY', nk, 'tokens_in', tin)
redis.call('HINCRBY', nk, 'tokens_out', tout)
redis.call('HINCRBY', rk, 'tokens_in', tin)
redis.call('HINCRBY', rk, 'tokens_out', tout)
if cost > 0 then
  redis.call('HINCRBYFLOAT', nk, 'cost_usd', ARGV[8])
  redis.call('HINCRBYFLOAT', rk, 'cost_usd', ARGV[8])
end
flush(rid, nid, attempt, ARGV[9])
return 1
