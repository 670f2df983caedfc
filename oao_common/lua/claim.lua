-- claim.lua: move up to ARGV[3] jobs from the worker's ready lists into its active list
-- (LMOVE, atomic: a job is never only in a client's memory) and turn them into RUNNING
-- attempts, in one round trip. Ready lists are taken in the order given: the worker's
-- queues in its order, each queue's priority bands high, normal, low (ADR 007).
-- KEYS[1] the worker's active list   KEYS[2..] the ready lists, in order
-- ARGV[2] worker id   ARGV[3] most jobs to claim
-- Returns an array, one entry per claimed job:
--   {job, attempt, {dep_id, dep_output_json, ...}, {ledger record or false, ...}, retries,
--    {seq, started_marker_json, ...}}
-- The ledger covers steps 1..max(steps_recorded, steps_started); started markers are
-- returned for the steps among those that have no recorded result.
-- A job of a run at its max_parallel_nodes cap moves to the run's parked list (released
-- when one of its nodes leaves RUNNING) and is not returned.
-- A job whose node is not READY (cancelled, duplicate) is removed and not returned.
local wid = ARGV[2]

local function claim_one(job)
  local rid, nid = split_job(job)
  local nk = node_key(rid, nid)
  local s = redis.call('HMGET', nk, 'status', 'deps', 'steps_recorded', 'retries', 'steps_started')
  if s[1] ~= 'READY' then
    redis.call('LREM', KEYS[1], 1, job)
    return nil
  end
  local rk = run_key(rid)
  local cap = tonumber(redis.call('HGET', rk, 'max_parallel') or '0')
  if cap > 0 then
    if tonumber(redis.call('HGET', rk, 'running') or '0') >= cap then
      redis.call('LREM', KEYS[1], 1, job)
      redis.call('RPUSH', parked_key(rid), job)
      emit(rid, 'NODE_PARKED', nid, 0, cjson.encode({max_parallel_nodes = cap}))
      return nil
    end
    redis.call('HINCRBY', rk, 'running', 1)
  end
  local attempt = redis.call('HINCRBY', nk, 'attempt', 1)
  redis.call('HSET', nk, 'status', 'RUNNING', 'lease', wid, 'claimed_at', NOW)
  redis.call('HSETNX', nk, 'started_at', NOW)
  if redis.call('HGET', rk, 'status') == 'PENDING' then
    redis.call('HSET', rk, 'status', 'RUNNING', 'started_at', NOW)
    emit(rid, 'RUN_STARTED', '', 0, '{}')
  end
  emit(rid, 'NODE_STARTED', nid, attempt, cjson.encode({worker = wid}))
  local outs = {}
  for d in string.gmatch(s[2] or '', '[^,]+') do
    table.insert(outs, d)
    table.insert(outs, redis.call('HGET', node_key(rid, d), 'output') or 'null')
  end
  local ledger, started = {}, {}
  local n = math.max(tonumber(s[3] or '0'), tonumber(s[5] or '0'))
  local sk = steps_key(rid)
  for i = 1, n do
    ledger[i] = redis.call('HGET', sk, nid .. ':' .. i)
    if not ledger[i] then
      local m = redis.call('HGET', sk, nid .. ':' .. i .. ':started')
      if m then table.insert(started, i); table.insert(started, m) end
    end
  end
  return {job, attempt, outs, ledger, tonumber(s[4] or '0'), started}
end

local out = {}
local want = tonumber(ARGV[3])
for i = 2, #KEYS do
  while #out < want do
    local job = redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT')
    if not job then break end
    local c = claim_one(job)
    if c then table.insert(out, c) end
  end
  if #out >= want then break end
end
return out
