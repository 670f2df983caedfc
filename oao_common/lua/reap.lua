-- reap.lua: hand the jobs of a dead worker back to the front of their ready lists.
-- Atomic and idempotent: a second reaper finds the heartbeat gone, the active list
-- empty and the worker unregistered, and does nothing.
-- KEYS[1] workers index (zset)   KEYS[2] the worker's heartbeat key
-- KEYS[3] the worker's active list   KEYS[4] the worker's info hash
-- KEYS[5] the worker's claim memo
-- ARGV[2] worker id   ARGV[3] max requeues per node before it is dead-lettered (-1: no limit)
-- Returns -1 if the worker is alive (heartbeat present), else
-- {requeued, poisoned, dropped, {run ids ended by a poisoned critical node}}.
local wid = ARGV[2]
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local counts = {requeued = 0, poison = 0, dropped = 0}
local ended = {}
for _, job in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  local r, rid = requeue_job(job, wid, 'NODE_REQUEUED', true, tonumber(ARGV[3]))
  counts[r] = counts[r] + 1
  if rid then table.insert(ended, rid) end
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[1], wid)
return {counts.requeued, counts.poison, counts.dropped, ended}
