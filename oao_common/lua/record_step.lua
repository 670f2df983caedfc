-- record_step.lua: append one executed step to the run's step ledger (fenced).
-- KEYS[1] the worker's active list   KEYS[2] the run's budget reservations hash
-- ARGV[2] worker id   ARGV[3] job   ARGV[4] fencing token   ARGV[5] step sequence number (1-based)
-- ARGV[6] ledger record (JSON)   ARGV[7] input tokens   ARGV[8] output tokens
-- ARGV[9] cost in USD   ARGV[10] "1" for a tool call, "0" otherwise
-- ARGV[11] buffered events (JSON array of [type, data_json])
-- ARGV[12] budget reservation id to settle ('' for none): usage and release in one step
-- ARGV[13] model messages the record refers to: JSON object ref -> canonical JSON, added
--          to the run's message store (HSETNX: content-addressed, written once) ('' none)
-- ARGV[14] "1" when the step counts in the run's step counter, "0" for ctx.now() & co.
-- Returns 1 when recorded (or already recorded by this same attempt: a retried call
-- after a lost reply changes nothing), 0 when the attempt is stale.
local wid, job, token, seq = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local rid, nid, nk, attempt = fence_or_reject(KEYS[1], job, wid, token, 'record_step')
if not rid then return 0 end
local prev = redis.call('HGET', steps_key(rid), nid .. ':' .. seq)
if prev and tostring(cjson.decode(prev).attempt) == attempt then return 1 end
redis.call('HSET', steps_key(rid), nid .. ':' .. seq, ARGV[6])
if seq > tonumber(redis.call('HGET', nk, 'steps_recorded') or '0') then
  redis.call('HSET', nk, 'steps_recorded', seq)
end
local tin, tout, cost = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local tool = tonumber(ARGV[10])
local rk = run_key(rid)
redis.call('HINCRBY', nk, 'tokens_in', tin)
redis.call('HINCRBY', nk, 'tokens_out', tout)
redis.call('HINCRBY', nk, 'tool_calls', tool)
if ARGV[14] ~= '0' then redis.call('HINCRBY', rk, 'steps', 1) end
redis.call('HINCRBY', rk, 'tokens_in', tin)
redis.call('HINCRBY', rk, 'tokens_out', tout)
redis.call('HINCRBY', rk, 'tool_calls', tool)
if cost > 0 then
  redis.call('HINCRBYFLOAT', nk, 'cost_usd', ARGV[9])
  redis.call('HINCRBYFLOAT', rk, 'cost_usd', ARGV[9])
end
if ARGV[13] and ARGV[13] ~= '' then
  local mk = msgs_key(rid)
  for ref, body in pairs(cjson.decode(ARGV[13])) do redis.call('HSETNX', mk, ref, body) end
end
if ARGV[12] and ARGV[12] ~= '' then
  drop_reservation(rk, KEYS[2], ARGV[12])
end
flush(rid, nid, attempt, ARGV[11])
return 1
