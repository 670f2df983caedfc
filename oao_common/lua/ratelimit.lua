-- ratelimit.lua: one fleet-wide rate limiter (oao_common/ratelimit.py), atomically.
-- Token buckets with continuous refill: a bucket of capacity C and window W refills at
-- C/W per ms up to C and starts full; a call costing c is admitted when level >= c.
-- Each bucket keeps two fields in the limiter hash, '<bucket>:l' (level, may be a
-- fraction; negative after an under-reserved settle) and '<bucket>:t' (server time of
-- its last refill, ms). 'penalty_until' (ms) blocks every admission until then.
-- Concurrency slots are leases in a sorted set, member lease id, score expiry (ms): a
-- crashed holder's slot frees itself when its lease expires.
-- KEYS[1] limiter hash   KEYS[2] concurrency slot zset
-- ARGV[2] op: 'acquire' | 'settle' | 'extend' | 'penalize' | 'peek'
-- ARGV[3] lease id ('' when the call holds no slot)
-- ARGV[4] requests: to take (acquire) or to give back (settle of a call never made)
-- ARGV[5] tokens: to take (acquire) or to give back (settle; negative charges extra)
-- ARGV[6] ms: lease time to live (acquire, extend) or penalty length (penalize)
-- ARGV[7] max concurrent leases (0: no cap)
-- ARGV[8] longest wait (ms) reported for a full concurrency cap (holders release early)
-- ARGV[9..] buckets, four arguments each: name, unit ('r' requests | 't' tokens),
--            capacity, window (ms)
-- Returns, by op:
--   acquire  {1} admitted (buckets debited, lease added) | {0, wait_ms, {blocked...}}
--            nothing taken; blocked names buckets, 'concurrency' or 'penalty'
--            | {-1, bucket} the cost exceeds that bucket's capacity: never admissible
--   settle   {removed}: 1 if the lease was still held (the tokens are credited anyway)
--   extend   {1} lease now expires at NOW + ARGV[6] | {0} lease already expired or released
--   penalize {until_ms}
--   peek     {{level_string, ...}, live_leases, penalty_ms_left}  (writes nothing)
local hk, sk, op, lease = KEYS[1], KEYS[2], ARGV[2], ARGV[3]
local requests, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local ms, max_conc, poll_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local buckets = {}
for i = 9, #ARGV, 4 do
  table.insert(buckets, {name = ARGV[i], unit = ARGV[i + 1],
    cap = tonumber(ARGV[i + 2]), win = tonumber(ARGV[i + 3])})
end

-- Level of bucket b now: stored level plus refill since its last refill, at most cap.
local function level(b)
  local s = redis.call('HMGET', hk, b.name .. ':l', b.name .. ':t')
  local l, t = tonumber(s[1]), tonumber(s[2])
  if l == nil or t == nil then return b.cap end
  l = l + math.max(0, NOW - t) * b.cap / b.win
  if l > b.cap then l = b.cap end
  return l
end

local function store(b, l)
  redis.call('HSET', hk, b.name .. ':l', tostring(l), b.name .. ':t', NOW)
end

local function penalty_left()
  local pu = tonumber(redis.call('HGET', hk, 'penalty_until') or '0')
  return math.max(0, pu - NOW)
end

-- An idle limiter refills completely within twice its longest window (a settle may
-- leave a debt of up to one capacity), so the hash may then vanish: absent = full.
local function expire_hash()
  local ttl = penalty_left()
  for _, b in ipairs(buckets) do ttl = math.max(ttl, 2 * b.win) end
  if ttl > 0 then redis.call('PEXPIRE', hk, math.ceil(ttl) + 1000) end
end

local function expire_slots()
  local last = redis.call('ZRANGE', sk, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', sk, math.max(1, tonumber(last[2]) - NOW) + 1000)
  end
end

if op == 'acquire' then
  local wait, blocked = 0, {}
  local p = penalty_left()
  if p > 0 then
    wait = p
    table.insert(blocked, 'penalty')
  end
  local levels = {}
  for i, b in ipairs(buckets) do
    local cost = (b.unit == 'r') and requests or tokens
    if cost > b.cap then return {-1, b.name} end
    levels[i] = level(b)
    if cost > 0 and levels[i] + 1e-9 < cost then
      wait = math.max(wait, (cost - levels[i]) * b.win / b.cap)
      table.insert(blocked, b.name)
    end
  end
  if max_conc > 0 then
    redis.call('ZREMRANGEBYSCORE', sk, '-inf', NOW)
    if redis.call('ZCARD', sk) >= max_conc then
      local first = redis.call('ZRANGE', sk, 0, 0, 'WITHSCORES')
      wait = math.max(wait, math.min(poll_ms, tonumber(first[2]) - NOW))
      table.insert(blocked, 'concurrency')
    end
  end
  if #blocked > 0 then
    return {0, math.max(1, math.ceil(wait)), blocked}
  end
  for i, b in ipairs(buckets) do
    local cost = (b.unit == 'r') and requests or tokens
    if cost > 0 then store(b, levels[i] - cost) end
  end
  expire_hash()
  if max_conc > 0 then
    redis.call('ZADD', sk, NOW + ms, lease)
    expire_slots()
  end
  return {1}
end

if op == 'settle' then
  if tokens ~= 0 or requests ~= 0 then
    for _, b in ipairs(buckets) do
      local back = (b.unit == 'r') and requests or tokens
      if back ~= 0 then
        store(b, math.max(-b.cap, math.min(b.cap, level(b) + back)))
      end
    end
    expire_hash()
  end
  local removed = 0
  if lease ~= '' then removed = redis.call('ZREM', sk, lease) end
  return {removed}
end

if op == 'extend' then
  local exp = tonumber(redis.call('ZSCORE', sk, lease) or '0')
  if exp <= NOW then
    redis.call('ZREM', sk, lease)
    return {0}
  end
  redis.call('ZADD', sk, 'XX', NOW + ms, lease)
  expire_slots()
  return {1}
end

if op == 'penalize' then
  local pu = math.max(NOW + penalty_left(), NOW + ms)
  redis.call('HSET', hk, 'penalty_until', pu)
  local ttl = redis.call('PTTL', hk)
  if ttl < pu - NOW + 1000 then redis.call('PEXPIRE', hk, pu - NOW + 1000) end
  return {pu}
end

if op == 'peek' then
  local out = {}
  for i, b in ipairs(buckets) do out[i] = tostring(level(b)) end
  local live = redis.call('ZCOUNT', sk, '(' .. NOW, '+inf')
  return {out, live, penalty_left()}
end

return redis.error_reply('ratelimit.lua: unknown op ' .. tostring(op))
