-- handback.lua: a worker returns the jobs it holds to the front of their ready lists.
-- Used at shutdown (everything) and after a Redis error, when jobs may sit in the
-- active list that the worker is not running (a claim whose reply was lost).
-- Unlike reap.lua this does not count toward max_requeues: the worker is not dead.
-- KEYS[1] the worker's active list
-- ARGV[2] worker id
-- ARGV[3] JSON array of jobs to keep (the ones the worker is running), or '[]'
-- Returns the number of jobs handed back.
local keep = {}
for _, j in ipairs(cjson.decode(ARGV[3])) do keep[j] = true end
local n = 0
for _, job in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if not keep[job] then
    if requeue_job(job, ARGV[2], 'NODE_HANDED_BACK', false, -1) == 'requeued' then n = n + 1 end
    redis.call('LREM', KEYS[1], 1, job)
  end
end
return n
