-- prune.lua: delete finished runs and every key they own (retention), atomically.
-- KEYS[1] runs index (zset)   KEYS[2] finished-runs index (zset: rid -> finished_at ms)
-- ARGV[2] cutoff in ms: only runs that finished at or before it are deleted
-- ARGV[3] most runs to delete in this call
-- ARGV[4] JSON array of run ids to consider; '' or '[]': the oldest entries of KEYS[2]
--         scored at or before the cutoff
-- ARGV[5] key budget: take no further run once this many keys were deleted ("0": none)
-- A run is deleted only when its status is terminal (SUCCEEDED, FAILED, CANCELLED,
-- PARTIAL) and its finished_at is at or before the cutoff; any other run is left as it
-- is. An id that names no run (or, from KEYS[2], a run not finished) leaves KEYS[2].
-- Deleted per run (UNLINK: memory is freed in the background): the run hash, its node
-- hashes (node_ids), events stream, steps and messages hashes, reservations hash and
-- parked list; its
-- entries of both indexes; and its reference to the stored spec (KEYS of Keys.spec,
-- field refs), whose key is deleted with the last reference.
-- Returns {runs deleted, keys deleted (spec keys included), {deleted run ids}}.
local cutoff, most, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5] or '0')
local ids
if ARGV[4] == nil or ARGV[4] == '' or ARGV[4] == '[]' then
  ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, most)
else
  ids = cjson.decode(ARGV[4])
end

local runs, keys, deleted = 0, 0, {}
for _, rid in ipairs(ids) do
  if runs >= most or (budget > 0 and keys >= budget) then break end
  local rk = run_key(rid)
  local r = redis.call('HMGET', rk, 'status', 'finished_at', 'node_ids', 'spec_hash')
  if not r[1] then
    redis.call('ZREM', KEYS[1], rid)
    redis.call('ZREM', KEYS[2], rid)
  elseif not is_run_terminal(r[1]) then
    redis.call('ZREM', KEYS[2], rid)
  elseif tonumber(r[2] or '0') <= cutoff then
    local doomed = {rk, string.format(T_EVENTS, rid), steps_key(rid), msgs_key(rid),
      parked_key(rid), string.format(T.reservations, rid)}
    for nid in string.gmatch(r[3] or '', '[^,]+') do table.insert(doomed, node_key(rid, nid)) end
    for i = 1, #doomed, 500 do
      keys = keys + redis.call('UNLINK', unpack(doomed, i, math.min(i + 499, #doomed)))
    end
    redis.call('ZREM', KEYS[1], rid)
    redis.call('ZREM', KEYS[2], rid)
    if r[4] and r[4] ~= '' then
      local sk = string.format(T.spec, r[4])
      if redis.call('HINCRBY', sk, 'refs', -1) <= 0 then
        keys = keys + redis.call('UNLINK', sk)
      end
    end
    runs = runs + 1
    table.insert(deleted, rid)
  end
end
return {runs, keys, deleted}
