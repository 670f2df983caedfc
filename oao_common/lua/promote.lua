-- promote.lua: move retries whose time has come from the delayed set to ready lists.
-- Safe with several schedulers: ZREM decides which caller promotes a job.
-- KEYS[1] the delayed set
-- ARGV[2] most jobs to promote in one call
-- Returns the number promoted.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for _, job in ipairs(due) do
  if redis.call('ZREM', KEYS[1], job) == 1 then
    local rid, nid = split_job(job)
    local nk = node_key(rid, nid)
    if redis.call('HGET', nk, 'status') == 'PENDING' then
      redis.call('HSET', nk, 'status', 'READY')
      redis.call('HDEL', nk, 'retry_at')
      push_ready(nk, job, false)
      emit(rid, 'NODE_READY', nid, 0, cjson.encode({retry = true}))
      n = n + 1
    end
  end
end
return n
