-- depths.lua: the jobs that are not in a ready list, counted by their node's ready list
-- (field 'ready': queue and priority band) and state, for the queue-depth gauges of
-- `serve` (oao_common/fleet_stats.py). Read-only but for dropping runs with nothing
-- parked from the parked-runs index.
-- KEYS[1] delayed set (zset)   KEYS[2] workers index (zset)   KEYS[3] parked-runs set
-- ARGV[2] most node hashes read; past it jobs count under the ready list '?' (so the
--         cost is bounded: O(workers + active jobs + parked runs + ARGV[2]))
-- Returns {state, ready_list, jobs, state, ready_list, jobs, ...} with state one of
-- delayed, active, parked.
local budget = tonumber(ARGV[2])
local counts, order = {}, {}
local function add(state, ready, n)
  local k = state .. '\n' .. ready
  if not counts[k] then counts[k] = 0; table.insert(order, {state, ready, k}) end
  counts[k] = counts[k] + n
end
local function attribute(state, jobs)
  for _, job in ipairs(jobs) do
    if budget > 0 then
      budget = budget - 1
      local rid, nid = split_job(job)
      add(state, redis.call('HGET', node_key(rid, nid), 'ready') or '?', 1)
    else
      add(state, '?', 1)
    end
  end
end

local delayed = redis.call('ZCARD', KEYS[1])
if delayed > 0 then
  local take = math.min(delayed, budget)
  if take > 0 then attribute('delayed', redis.call('ZRANGE', KEYS[1], 0, take - 1)) end
  if delayed > take then add('delayed', '?', delayed - take) end
end
for _, wid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  attribute('active', redis.call('LRANGE', string.format(T.active, wid), 0, -1))
end
for _, rid in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local pk = parked_key(rid)
  local n = redis.call('LLEN', pk)
  if n == 0 then
    redis.call('SREM', KEYS[3], rid)
  else
    local take = math.min(n, budget)
    if take > 0 then attribute('parked', redis.call('LRANGE', pk, 0, take - 1)) end
    if n > take then add('parked', '?', n - take) end
  end
end
local out = {}
for _, e in ipairs(order) do
  table.insert(out, e[1]); table.insert(out, e[2]); table.insert(out, counts[e[3]])
end
return out
