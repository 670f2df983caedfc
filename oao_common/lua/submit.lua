-- submit.lua: write a run and its nodes, push the root nodes, in one atomic step.
-- KEYS[1] run hash            KEYS[2] runs index (zset)
-- then, only those that apply, in this order: the stored spec (hash: json, refs; when
-- ARGV[7] is not empty), the idempotency key (when the submission has one)
-- ARGV[2] run id
-- ARGV[3] run fields: JSON object of string values (status, spec_hash, inputs, ...)
-- ARGV[4] nodes: JSON array of {id, fields} with fields a JSON object of strings;
--         a node whose fields.status is READY is pushed to its ready list (fields.ready)
-- ARGV[5] RUN_SUBMITTED event data (JSON)
-- ARGV[6] idempotency TTL in seconds ("0": none)
-- ARGV[7] the spec's canonical JSON without inputs, written once per stored-spec key;
--         every run written adds one to its refs, prune.lua takes it away ('' when the
--         run hash holds its whole spec)
-- ARGV[8] replay seed of the step ledger: JSON object "<node>:<seq>" -> record JSON, written
--         to the run's steps hash ('' none; oao_scheduler/replay.py)
-- ARGV[9] model messages those records refer to: JSON object ref -> message JSON ('' none)
-- A node whose fields.status is SUCCEEDED was copied from the run it replays: it gets a
-- NODE_SUCCEEDED event (data {copied_from}) and is never pushed.
-- Returns {1, rid} when written, {0, existing_rid} when the run or the idempotency
-- key already exists (nothing written).
local rid = ARGV[2]
local spec_key, idem = nil, KEYS[3]
if ARGV[7] ~= '' then spec_key, idem = KEYS[3], KEYS[4] end
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {0, existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, rid} end

hset_fields(KEYS[1], cjson.decode(ARGV[3]), 'created_at', NOW)
emit(rid, 'RUN_SUBMITTED', '', 0, ARGV[5])

for _, node in ipairs(cjson.decode(ARGV[4])) do
  hset_fields(node_key(rid, node.id), node.fields)
  if node.fields.status == 'READY' then
    push_ready(node_key(rid, node.id), rid .. '/' .. node.id, false)
    emit(rid, 'NODE_READY', node.id, 0, '{}')
  elseif node.fields.status == 'SUCCEEDED' then
    emit(rid, 'NODE_SUCCEEDED', node.id, 0, cjson.encode({copied_from = node.fields.copied_from}))
  end
end
-- the seed may be large: HSET in chunks (unpack has a stack limit)
local function hset_chunked(key, fields)
  local args = {}
  for k, v in pairs(fields) do
    table.insert(args, k); table.insert(args, v)
    if #args >= 1000 then redis.call('HSET', key, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
end
if ARGV[8] and ARGV[8] ~= '' then hset_chunked(steps_key(rid), cjson.decode(ARGV[8])) end
if ARGV[9] and ARGV[9] ~= '' then hset_chunked(msgs_key(rid), cjson.decode(ARGV[9])) end
redis.call('ZADD', KEYS[2], NOW, rid)
if spec_key then
  redis.call('HSETNX', spec_key, 'json', ARGV[7])
  redis.call('HINCRBY', spec_key, 'refs', 1)
end
if idem then
  local ttl = tonumber(ARGV[6])
  if ttl > 0 then redis.call('SET', idem, rid, 'EX', ttl) else redis.call('SET', idem, rid) end
end
return {1, rid}
