-- submit.lua: write a run and its nodes, push the root nodes, in one atomic step.
-- KEYS[1] run hash            KEYS[2] runs index (zset)
-- KEYS[3] idempotency key, only when the submit has one (an ACL user restricted to the
--         prefix may not name an empty key)
-- ARGV[2] run id
-- ARGV[3] run fields: JSON object of string values (status, spec, exec_hash, ...)
-- ARGV[4] nodes: JSON array of {id, fields} with fields a JSON object of strings;
--         a node whose fields.status is READY is pushed to its ready list (fields.ready)
-- ARGV[5] RUN_SUBMITTED event data (JSON)
-- ARGV[6] idempotency TTL in seconds ("0": none)
-- Returns {1, rid} when written, {0, existing_rid} when the run or the idempotency
-- key already exists (nothing written).
local rid = ARGV[2]
local idem = KEYS[3]
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
  end
end
redis.call('ZADD', KEYS[2], NOW, rid)
if idem then
  local ttl = tonumber(ARGV[6])
  if ttl > 0 then redis.call('SET', idem, rid, 'EX', ttl) else redis.call('SET', idem, rid) end
end
return {1, rid}
