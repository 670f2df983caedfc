-- begin_step.lua: mark a tool step as started before it executes (fenced).
-- A zombie worker (paused, reaped, resumed) is stopped here, before its side effect;
-- and a marker without a result tells the next attempt that the call may have
-- happened (re-executed only for tools declared idempotent).
-- KEYS[1] the worker's active list
-- ARGV[2] worker id   ARGV[3] job   ARGV[4] fencing token   ARGV[5] step sequence number
-- ARGV[6] marker (JSON: kind, name, request_hash, attempt, idempotent)
-- ARGV[7] buffered events (JSON array of [type, data_json])
-- Returns 1 when marked, 0 when the attempt is stale (nothing written).
local wid, job, token, seq = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local rid, nid, nk, attempt = fence_or_reject(KEYS[1], job, wid, token, 'begin_step')
if not rid then return 0 end
redis.call('HSET', steps_key(rid), nid .. ':' .. seq .. ':started', ARGV[6])
if seq > tonumber(redis.call('HGET', nk, 'steps_started') or '0') then
  redis.call('HSET', nk, 'steps_started', seq)
end
flush(rid, nid, attempt, ARGV[7])
return 1
