-- claim.lua: move up to ARGV[3] jobs from the worker's ready lists into its active list
-- (LMOVE, atomic: a job is never only in a client's memory) and turn them into RUNNING
-- attempts, in one round trip. Ready lists are taken in the order given: the worker's
-- queues in its order, each queue's priority bands high, normal, low (ADR 007).
-- KEYS[1] the worker's active list   KEYS[2] the worker's claim memo
-- KEYS[3..] the ready lists, in order
-- ARGV[2] worker id   ARGV[3] most jobs to claim
-- ARGV[4] claim id: random, one per call of the worker (a re-sent call keeps it)
-- Returns an array, one entry per claimed job:
--   {job, attempt, fence, {dep_id, dep_output_json, ...}, {ledger record or false, ...},
--    retries, {seq, started_marker_json, ...}, traceparent or false}
-- traceparent is the run's W3C trace context (run field written at submit): a node's
-- spans are children of its run's span on whichever worker runs it (tracing.py).
-- fence is the job's fencing token "<attempt>:<claim id>:<i>": every later write of the
-- attempt must present it (_lib.lua fenced). It contains the random claim id, so it is
-- never issued twice, even if Redis loses writes and the attempt counter goes back.
-- Idempotent per claim id: the memo (KEYS[2], one minute) remembers the last call's id
-- and jobs; the same id again (a client that re-sent the call after a lost reply)
-- returns the jobs it took that are still held under their fence, and claims nothing new.
-- The ledger covers steps 1..max(steps_recorded, steps_started); started markers are
-- returned for the steps among those that have no recorded result.
-- A job of a run at its max_parallel_nodes cap moves to the run's parked list (released
-- when one of its nodes leaves RUNNING) and is not returned.
-- A job whose node is not READY (cancelled, duplicate) is removed and not returned.
local wid, claim_id = ARGV[2], ARGV[4]
local MEMO_TTL_MS = 60000

-- What the worker needs to run an attempt of job (node key nk) it holds under fence.
local function payload(job, rid, nid, nk, attempt, fence)
  local s = redis.call('HMGET', nk, 'deps', 'steps_recorded', 'retries', 'steps_started')
  local outs = {}
  for d in string.gmatch(s[1] or '', '[^,]+') do
    table.insert(outs, d)
    table.insert(outs, redis.call('HGET', node_key(rid, d), 'output') or 'null')
  end
  local ledger, started = {}, {}
  local n = math.max(tonumber(s[2] or '0'), tonumber(s[4] or '0'))
  local sk = steps_key(rid)
  for i = 1, n do
    ledger[i] = redis.call('HGET', sk, nid .. ':' .. i)
    if not ledger[i] then
      local m = redis.call('HGET', sk, nid .. ':' .. i .. ':started')
      if m then table.insert(started, i); table.insert(started, m) end
    end
  end
  local tp = redis.call('HGET', run_key(rid), 'traceparent')
  return {job, attempt, fence, outs, ledger, tonumber(s[3] or '0'), started, tp}
end

local function claim_one(job, i)
  local rid, nid = split_job(job)
  local nk = node_key(rid, nid)
  if redis.call('HGET', nk, 'status') ~= 'READY' then
    redis.call('LREM', KEYS[1], 1, job)
    return nil
  end
  local rk = run_key(rid)
  local cap = tonumber(redis.call('HGET', rk, 'max_parallel') or '0')
  if cap > 0 then
    if tonumber(redis.call('HGET', rk, 'running') or '0') >= cap then
      redis.call('LREM', KEYS[1], 1, job)
      redis.call('RPUSH', parked_key(rid), job)
      redis.call('SADD', T.parked_runs, rid)  -- for the queue depths (depths.lua)
      emit(rid, 'NODE_PARKED', nid, 0, cjson.encode({max_parallel_nodes = cap}))
      return nil
    end
    redis.call('HINCRBY', rk, 'running', 1)
  end
  local attempt = redis.call('HINCRBY', nk, 'attempt', 1)
  local fence = attempt .. ':' .. claim_id .. ':' .. i
  redis.call('HSET', nk, 'status', 'RUNNING', 'lease', wid, 'fence', fence, 'claimed_at', NOW)
  redis.call('HSETNX', nk, 'started_at', NOW)
  drop_node_reservations(rid, nid)
  if redis.call('HGET', rk, 'status') == 'PENDING' then
    redis.call('HSET', rk, 'status', 'RUNNING', 'started_at', NOW)
    emit(rid, 'RUN_STARTED', '', 0, '{}')
  end
  emit(rid, 'NODE_STARTED', nid, attempt, cjson.encode({worker = wid}))
  return payload(job, rid, nid, nk, attempt, fence)
end

local out = {}
local memo = redis.call('GET', KEYS[2])
if memo then
  local m = cjson.decode(memo)
  if m.id == claim_id then
    for _, jf in ipairs(m.jobs) do
      local rid, nid = split_job(jf[1])
      local nk = node_key(rid, nid)
      local ok, s = fenced(nk, wid, jf[2])
      if ok then table.insert(out, payload(jf[1], rid, nid, nk, tonumber(s[4]), jf[2])) end
    end
    return out
  end
end

local want = tonumber(ARGV[3])
local taken = {}
for i = 3, #KEYS do
  while #out < want do
    local job = redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT')
    if not job then break end
    local c = claim_one(job, #taken + 1)
    if c then
      table.insert(out, c)
      table.insert(taken, {job, c[3]})
    end
  end
  if #out >= want then break end
end
if #taken > 0 then
  redis.call('SET', KEYS[2], cjson.encode({id = claim_id, jobs = taken}), 'PX', MEMO_TTL_MS)
end
return out
