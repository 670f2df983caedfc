-- _lib.lua: shared helpers, prepended to every OAO script by oao_common/scripts.py.
--
-- ARGV[1] of every script is a JSON object of key templates from oao_common/keys.py
-- (string.format patterns), so no key name is spelled in Lua:
--   run "<p>:run:{%s}", node "<p>:run:{%s}:node:%s", events "<p>:run:{%s}:events",
--   queue "<p>:q:%s", steps "<p>:run:{%s}:steps", msgs "<p>:run:{%s}:msgs",
--   parked "<p>:run:{%s}:parked",
--   finished "<p>:runs:finished" (a fixed key: the stream of run endings),
--   wake "<p>:wake:%s" (per queue: tokens for idle workers).
-- A node's ready list is queue_key(<node field 'ready'>): its queue and priority band.
-- Script-specific arguments start at ARGV[2].
-- Jobs are "<rid>/<nid>". Times are server time (TIME) in ms since the epoch.

local T = cjson.decode(ARGV[1])
local T_RUN, T_NODE, T_EVENTS, T_QUEUE, T_STEPS = T.run, T.node, T.events, T.queue, T.steps

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW = now_ms()

local function run_key(rid) return string.format(T_RUN, rid) end
local function node_key(rid, nid) return string.format(T_NODE, rid, nid) end
local function queue_key(q) return string.format(T_QUEUE, q) end
local function steps_key(rid) return string.format(T_STEPS, rid) end
local function parked_key(rid) return string.format(T.parked, rid) end
local function msgs_key(rid) return string.format(T.msgs, rid) end

-- Push a job onto its node's ready list (queue + priority band, node field 'ready'):
-- at the back (LPUSH; consumers take from the right), or at the front (RPUSH) for a
-- job handed back. Then drop a wake token for idle workers of that queue (a hint:
-- the list is capped, and losing a token only costs an idle worker one timeout).
local WAKE_CAP = 64
local function push_ready(nk, job, front)
  local f = redis.call('HMGET', nk, 'ready', 'queue')
  local key = string.format(T.queue, f[1] or f[2])
  if front then redis.call('RPUSH', key, job) else redis.call('LPUSH', key, job) end
  local wake = string.format(T.wake, f[2])
  redis.call('LPUSH', wake, '1')
  redis.call('LTRIM', wake, 0, WAKE_CAP - 1)
end

local function split_job(job)
  local i = string.find(job, '/', 1, true)
  return string.sub(job, 1, i - 1), string.sub(job, i + 1)
end

-- Budget reservations (budget.lua, record_step.lua). A reservation is a field of the
-- run's reservations hash: id -> "tokens_in tokens_out cost_usd expires_ms". The run
-- hash keeps the totals res_in, res_out, res_cost so checks are O(1).
local function parse_reservation(v)
  local a, b, c, d = string.match(v, '^(%S+) (%S+) (%S+) (%S+)$')
  return tonumber(a), tonumber(b), tonumber(c), tonumber(d)
end

local function drop_reservation(rk, resk, id)
  local v = redis.call('HGET', resk, id)
  if not v then return end
  local tin, tout, cost = parse_reservation(v)
  redis.call('HDEL', resk, id)
  redis.call('HINCRBY', rk, 'res_in', -tin)
  redis.call('HINCRBY', rk, 'res_out', -tout)
  redis.call('HINCRBYFLOAT', rk, 'res_cost', -cost)
end

-- Drop every reservation of node nid (ids "<nid>#<attempt>#<seq>"): an attempt that
-- died, was handed back or is superseded by a new claim spends nothing more.
local function drop_node_reservations(rid, nid)
  local resk = string.format(T.reservations, rid)
  local prefix = nid .. '#'
  for _, id in ipairs(redis.call('HKEYS', resk)) do
    if string.sub(id, 1, #prefix) == prefix then drop_reservation(run_key(rid), resk, id) end
  end
end

-- HSET key with the pairs of a table of field -> string (decoded JSON) plus extra
-- field, value arguments; nothing when both are empty.
local function hset_fields(key, fields, ...)
  local args = {...}
  for k, v in pairs(fields) do
    table.insert(args, k); table.insert(args, v)
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
end

local function emit(rid, typ, nid, attempt, data)
  redis.call('XADD', string.format(T_EVENTS, rid), '*',
    'type', typ, 'node', nid or '', 'attempt', tostring(attempt or 0),
    'ts', tostring(NOW), 'data', data or '{}')
end

-- Events buffered by a worker: JSON array of [type, data_json] pairs.
local function flush(rid, nid, attempt, events_json)
  if events_json == nil or events_json == '' or events_json == '[]' then return end
  for _, ev in ipairs(cjson.decode(events_json)) do
    emit(rid, ev[1], nid, attempt, ev[2])
  end
end

local function is_terminal(st)
  return st == 'SUCCEEDED' or st == 'FAILED' or st == 'SKIPPED' or st == 'CANCELLED'
end

local function is_run_terminal(st)
  return st == 'SUCCEEDED' or st == 'FAILED' or st == 'CANCELLED' or st == 'PARTIAL'
end

-- The fencing check (docs/adr/002-fencing-and-attempts.md): a write on behalf of node nk
-- is accepted only from the worker holding the lease, with the fencing token of the
-- current claim. The token is made of a random per-call claim id (claim.lua), so it is
-- never issued twice, even after Redis lost writes and attempt numbers repeat.
-- s = {status, lease, fence, attempt}
local function fenced(nk, wid, token)
  local s = redis.call('HMGET', nk, 'status', 'lease', 'fence', 'attempt')
  return s[1] == 'RUNNING' and s[2] == wid and s[3] == token, s
end

-- Record a rejected write. The job leaves the caller's active list only when no
-- live claim of this worker can own it (a newer attempt by the same worker must
-- keep its entry, or a crash would lose it). Nothing is written for a run that no
-- longer exists (pruned, or lost by Redis): no orphan event stream.
local function reject_stale(active, job, rid, nid, wid, attempt, s, what)
  if redis.call('EXISTS', run_key(rid)) == 1 then
    emit(rid, 'STALE_ATTEMPT_REJECTED', nid, attempt, cjson.encode({
      worker = wid, write = what, current_status = s[1] or '',
      current_attempt = tonumber(s[4] or '0'), current_lease = s[2] or ''}))
  end
  if active ~= nil and s[1] ~= 'READY' and not (s[1] == 'RUNNING' and s[2] == wid) then
    redis.call('LREM', active, 1, job)
  end
end

-- The start of every fenced write: parse the job and check the fence. Returns
-- rid, nid, node key, attempt (the node's attempt number, for events) when the caller
-- holds the node; nil after recording a rejection.
local function fence_or_reject(active, job, wid, token, what)
  local rid, nid = split_job(job)
  local nk = node_key(rid, nid)
  local ok, s = fenced(nk, wid, token)
  if not ok then
    local _, _, attempt = string.find(token, '^(%d+)')
    reject_stale(active, job, rid, nid, wid, attempt or 0, s, what)
    return nil
  end
  return rid, nid, nk, s[4]
end

-- A re-sent complete / fail (what: 'complete' or 'fail') of an attempt that already
-- closed that way gets the first answer, even after later attempts closed too: the
-- node hash keeps one field per closed attempt, 'closed:<fence>' = '<what> <answer>'
-- (fencing tokens are never reused, so the field names the call).
local function close_attempt(nk, token, what, result)
  redis.call('HSET', nk, 'closed:' .. token, what .. ' ' .. result)
end

local function closed_result(job, token, what)
  local rid, nid = split_job(job)
  local c = redis.call('HGET', node_key(rid, nid), 'closed:' .. token)
  if not c then return nil end
  local w, r = string.match(c, '^(%S+) (%S+)$')
  if w == what then return tonumber(r) end
  return nil
end

-- Announce a run's end on the fleet's stream of endings (escalation reads it).
local function announce_end(rid, status)
  redis.call('XADD', T.finished, 'MAXLEN', '~', 100000, '*', 'rid', rid, 'status', status)
  redis.call('ZADD', T.done, NOW, rid)  -- the finished-runs index retention prunes from
end

-- The run's final state once every node is terminal (docs/architecture.md, run states;
-- FailureSpec): no failure: SUCCEEDED; no node succeeded, or failed / total >
-- max_failure_ratio: FAILED; else PARTIAL when the run allows partial completion,
-- FAILED otherwise. (Runs written before nodes_succeeded existed lack the field.)
local function finish_run_if_done(rid)
  local rk = run_key(rid)
  local r = redis.call('HMGET', rk, 'status', 'nodes_total', 'nodes_done', 'nodes_failed',
    'allow_partial', 'max_failure_ratio', 'nodes_succeeded')
  if is_run_terminal(r[1]) then return end
  local total = tonumber(r[2] or '0')
  if tonumber(r[3] or '0') < total then return end
  local failed = tonumber(r[4] or '0')
  local none_succeeded = r[7] ~= false and r[7] ~= nil and tonumber(r[7]) == 0
  local data = cjson.encode({nodes_failed = failed, nodes = total})
  if failed == 0 then
    redis.call('HSET', rk, 'status', 'SUCCEEDED', 'finished_at', NOW)
    emit(rid, 'RUN_SUCCEEDED', '', 0, data)
    announce_end(rid, 'SUCCEEDED')
  elseif r[5] == '1' and not none_succeeded and failed / total <= tonumber(r[6] or '0.5') then
    redis.call('HSET', rk, 'status', 'PARTIAL', 'finished_at', NOW)
    emit(rid, 'RUN_PARTIAL', '', 0, data)
    announce_end(rid, 'PARTIAL')
  else
    redis.call('HSET', rk, 'status', 'FAILED', 'finished_at', NOW)
    emit(rid, 'RUN_FAILED', '', 0, data)
    announce_end(rid, 'FAILED')
  end
end

-- max_parallel_nodes: a run with a cap counts its RUNNING nodes; a node leaving RUNNING
-- (completed, failed, requeued) hands its slot to the oldest parked job of the run.
local function leave_running(rid)
  local rk = run_key(rid)
  if tonumber(redis.call('HGET', rk, 'max_parallel') or '0') <= 0 then return end
  redis.call('HINCRBY', rk, 'running', -1)
  local job = redis.call('LPOP', parked_key(rid))
  if job then
    local _, nid = split_job(job)
    push_ready(node_key(rid, nid), job, true)
    emit(rid, 'NODE_READY', nid, 0, cjson.encode({unparked = true}))
  end
end

-- Every node not yet terminal becomes CANCELLED; returns how many.
local function cancel_nodes(rid)
  redis.call('DEL', parked_key(rid))
  local n = 0
  for nid in string.gmatch(redis.call('HGET', run_key(rid), 'node_ids') or '', '[^,]+') do
    local nk = node_key(rid, nid)
    if not is_terminal(redis.call('HGET', nk, 'status')) then
      redis.call('HSET', nk, 'status', 'CANCELLED', 'finished_at', NOW)
      redis.call('HDEL', nk, 'lease', 'fence', 'retry_at')
      emit(rid, 'NODE_CANCELLED', nid, 0, '{}')
      n = n + 1
    end
  end
  return n
end

-- Decrement each dependent's pending counter; push the ones that reach zero.
local function release_dependents(rid, nid)
  local deps = redis.call('HGET', node_key(rid, nid), 'dependents') or ''
  for d in string.gmatch(deps, '[^,]+') do
    local dk = node_key(rid, d)
    if redis.call('HGET', dk, 'status') == 'PENDING' then
      if redis.call('HINCRBY', dk, 'pending', -1) <= 0 then
        redis.call('HSET', dk, 'status', 'READY')
        push_ready(dk, rid .. '/' .. d, false)
        emit(rid, 'NODE_READY', d, 0, '{}')
      end
    end
  end
end

-- Mark every not-yet-started descendant of nid SKIPPED; returns how many.
local function skip_descendants(rid, nid)
  local todo = {nid}
  local skipped = 0
  while #todo > 0 do
    local cur = table.remove(todo)
    local deps = redis.call('HGET', node_key(rid, cur), 'dependents') or ''
    for d in string.gmatch(deps, '[^,]+') do
      local dk = node_key(rid, d)
      if redis.call('HGET', dk, 'status') == 'PENDING' then
        redis.call('HSET', dk, 'status', 'SKIPPED', 'finished_at', NOW,
          'error', cjson.encode({type = 'Skipped', message = 'upstream node ' .. nid .. ' failed'}))
        emit(rid, 'NODE_SKIPPED', d, 0, cjson.encode({cause = nid}))
        skipped = skipped + 1
        table.insert(todo, d)
      end
    end
  end
  return skipped
end

-- Final failure of a node: FAILED, descendants SKIPPED, run accounting. A critical
-- node fails its run at once and cancels the rest. Returns true when the run ended
-- because of this failure while other nodes were still in flight (callers then tell
-- the workers, so running nodes stop without waiting for their next write).
local function fail_node(rid, nid, attempt, error_json)
  local nk = node_key(rid, nid)
  redis.call('HSET', nk, 'status', 'FAILED', 'error', error_json, 'finished_at', NOW)
  redis.call('HDEL', nk, 'lease', 'fence', 'retry_at')
  drop_node_reservations(rid, nid)
  emit(rid, 'NODE_FAILED', nid, attempt, error_json)
  local skipped = skip_descendants(rid, nid)
  local rk = run_key(rid)
  redis.call('HINCRBY', rk, 'nodes_failed', 1)
  redis.call('HINCRBY', rk, 'nodes_done', 1 + skipped)
  if redis.call('HGET', nk, 'critical') == '1' and not is_run_terminal(redis.call('HGET', rk, 'status')) then
    local n = cancel_nodes(rid)
    redis.call('HSET', rk, 'status', 'FAILED', 'finished_at', NOW)
    emit(rid, 'RUN_FAILED', '', 0, cjson.encode({reason = 'critical node ' .. nid .. ' failed',
      critical_node = nid, nodes_cancelled = n}))
    announce_end(rid, 'FAILED')
    return n > 0
  end
  finish_run_if_done(rid)
  return false
end

-- Put a job of worker wid back at the front of its ready list, if the worker still
-- owns it (RUNNING under its lease) or had moved it without claiming it (READY).
-- count_requeue: count toward max_requeues (reaper) or not (graceful handback).
-- Returns 'requeued', 'poison' or 'dropped'.
local function requeue_job(job, wid, event_type, count_requeue, max_requeues)
  local rid, nid = split_job(job)
  local nk = node_key(rid, nid)
  local s = redis.call('HMGET', nk, 'status', 'lease', 'attempt', 'queue')
  if not (s[1] == 'READY' or (s[1] == 'RUNNING' and s[2] == wid)) then
    return 'dropped'
  end
  if s[1] == 'RUNNING' then leave_running(rid) end
  drop_node_reservations(rid, nid)
  local n = tonumber(redis.call('HGET', nk, 'requeues') or '0')
  if count_requeue then
    n = redis.call('HINCRBY', nk, 'requeues', 1)
    if max_requeues >= 0 and n > max_requeues then
      local ended = fail_node(rid, nid, s[3], cjson.encode({type = 'PoisonJob', reason = 'poison',
        message = 'requeued ' .. (n - 1) .. ' times after worker deaths (max_requeues '
          .. max_requeues .. '); dead-lettered'}))
      return 'poison', ended and rid or nil
    end
  end
  redis.call('HSET', nk, 'status', 'READY')
  redis.call('HDEL', nk, 'lease', 'fence')
  push_ready(nk, job, true)
  emit(rid, event_type, nid, s[3], cjson.encode({worker = wid, requeues = n}))
  return 'requeued'
end
