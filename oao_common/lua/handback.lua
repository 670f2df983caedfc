-- handback.lua: a worker returns jobs of its active list to the front of their ready
-- lists. Three uses:
--   * shutdown: everything (keep '[]'), mode 'handback';
--   * reconciliation (periodic, and after a Redis error): the jobs it is not running
--     (keep = the jobs it runs), mode 'handback': a claim whose reply was lost, a node
--     that Redis "forgot" finished (lost writes) and shows RUNNING under this worker;
--   * start-up, mode 'recover': a worker restarted under the same id (a pod name) finds
--     the jobs of its previous life, which died with it. Like reap.lua this counts
--     toward max_requeues (a node that kills its worker every time is dead-lettered).
--   * mode 'release': only the jobs listed (nodes the worker stopped because their run
--     was cancelled): safe next to a claim in flight, which cannot take those jobs.
-- KEYS[1] the worker's active list
-- ARGV[2] worker id
-- ARGV[3] JSON array of jobs: to keep (the ones the worker is running; '[]' for none),
--         or, in mode 'release', the only ones to hand back
-- ARGV[4] mode: 'handback', 'recover' or 'release'
-- ARGV[5] max requeues (mode 'recover'; -1: no limit)
-- Returns {handed back, poisoned, {run ids ended by a poisoned critical node}}.
local listed = {}
for _, j in ipairs(cjson.decode(ARGV[3])) do listed[j] = true end
local recover = ARGV[4] == 'recover'
local only = ARGV[4] == 'release'
local event = recover and 'NODE_REQUEUED' or 'NODE_HANDED_BACK'
local n, poisoned, ended = 0, 0, {}
for _, job in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (listed[job] ~= nil) == only then
    local r, rid = requeue_job(job, ARGV[2], event, recover, tonumber(ARGV[5] or '-1'))
    if r == 'requeued' then n = n + 1 elseif r == 'poison' then poisoned = poisoned + 1 end
    if rid then table.insert(ended, rid) end
    redis.call('LREM', KEYS[1], 1, job)
  end
end
return {n, poisoned, ended}
