-- circuit.lua: one fleet-wide circuit breaker (oao_common/circuit.py), atomically.
-- States closed -> open -> half_open -> closed, in one hash:
--   state       'closed' (or absent) | 'open' | 'half_open'
--   gen         incremented at every opening; a permit records only into its own
--               generation, so calls started before a trip cannot close or reopen it
--   open_until  server time (ms) the cool-down ends; the first call after it turns the
--               state half_open
--   probes      half_open only: JSON object probe id -> lease expiry (ms); a probe
--               whose holder crashed stops counting when its lease expires
--   w:<i>       closed only: ring of the rolling window, N buckets of width
--               ceil(window/N) ms; bucket i holds "<bucket number>:<calls>:<failures>"
--               for bucket number floor(NOW/width) with that number mod N = i. The
--               window is the current bucket and the N-1 before it.
-- KEYS[1] circuit hash
-- ARGV[2] op: 'before' | 'record' | 'peek'
-- ARGV[3] permit id (the probe's lease id in half_open)
-- ARGV[4] failure ratio (0..1]   ARGV[5] window (ms)   ARGV[6] N, buckets in window
-- ARGV[7] min calls in window   ARGV[8] cool-down (ms)   ARGV[9] half-open probes
-- ARGV[10] probe lease (ms)
-- record only: ARGV[11] permit kind 'call' | 'probe'   ARGV[12] permit generation
--              ARGV[13] '1' success | '0' failure
-- Returns, by op:
--   before  {1, kind, gen} admitted as 'call' (closed) or 'probe' (half_open)
--           | {0, state, retry_after_ms} rejected: 'open' (ms until half_open) or
--           'half_open' (every probe slot taken; ms until the first probe lease ends,
--           at most the cool-down)
--   record  {state after the outcome}
--   peek    {state, calls, failures, retry_after_ms, probes in flight, gen}
--           (writes nothing; an open circuit past its cool-down reads 'half_open')
local hk, op, pid = KEYS[1], ARGV[2], ARGV[3]
local ratio, window, nb = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local min_calls, cool, max_probes = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local probe_ms = tonumber(ARGV[10])
local width = math.max(1, math.ceil(window / nb))
local cur_b = math.floor(NOW / width)

local h = redis.call('HMGET', hk, 'state', 'gen', 'open_until', 'probes')
local state, gen = h[1] or 'closed', tonumber(h[2] or '0')
local open_until = tonumber(h[3] or '0')

local function parse_bucket(v)
  if not v then return nil, 0, 0 end
  local b, c, f = string.match(v, '^(%d+):(%d+):(%d+)$')
  return tonumber(b), tonumber(c), tonumber(f)
end

-- Calls and failures in the window (closed state).
local function window_counts()
  local fields = {}
  for i = 0, nb - 1 do fields[i + 1] = 'w:' .. i end
  local vals = redis.call('HMGET', hk, unpack(fields))
  local calls, fails = 0, 0
  for i = 1, nb do
    local b, c, f = parse_bucket(vals[i])
    if b and b > cur_b - nb and b <= cur_b then
      calls, fails = calls + c, fails + f
    end
  end
  return calls, fails
end

local function clear_window()
  for i = 0, nb - 1 do redis.call('HDEL', hk, 'w:' .. i) end
end

-- Live probes: decoded map without expired leases.
local function live_probes()
  local live, n, first = {}, 0, nil
  if h[4] and h[4] ~= '' then
    for id, exp in pairs(cjson.decode(h[4])) do
      if exp > NOW then
        live[id] = exp
        n = n + 1
        if first == nil or exp < first then first = exp end
      end
    end
  end
  return live, n, first
end

-- Idle keys expire: a closed window is empty after one window; an open or half-open
-- circuit nobody calls for a day closes by vanishing.
local function touch(st)
  if st == 'closed' then
    redis.call('PEXPIRE', hk, window + width + 1000)
  else
    redis.call('PEXPIRE', hk, cool + 86400000)
  end
end

local function trip()
  clear_window()
  gen = gen + 1
  redis.call('HSET', hk, 'state', 'open', 'gen', gen, 'open_until', NOW + cool,
    'opened_at', NOW, 'probes', '{}')
  touch('open')
  return 'open'
end

local function reset()
  clear_window()
  redis.call('HSET', hk, 'state', 'closed', 'probes', '{}', 'closed_at', NOW)
  touch('closed')
  return 'closed'
end

if op == 'before' then
  if state == 'closed' then return {1, 'call', gen} end
  if state == 'open' then
    if NOW < open_until then return {0, 'open', math.max(1, open_until - NOW)} end
    state = 'half_open'
    h[4] = '{}'
    redis.call('HSET', hk, 'state', 'half_open', 'probes', '{}', 'half_open_at', NOW)
  end
  local live, n, first = live_probes()
  if n >= max_probes then
    return {0, 'half_open', math.max(1, math.min(cool, first - NOW))}
  end
  live[pid] = NOW + probe_ms
  redis.call('HSET', hk, 'probes', cjson.encode(live))
  touch('half_open')
  return {1, 'probe', gen}
end

if op == 'record' then
  local kind, pgen, ok = ARGV[11], tonumber(ARGV[12]), ARGV[13] == '1'
  if pgen ~= gen then return {state} end
  if kind == 'probe' then
    if state ~= 'half_open' then return {state} end
    if ok then return {reset()} end
    return {trip()}
  end
  if state ~= 'closed' then return {state} end
  local f = 'w:' .. (cur_b % nb)
  local b, c, fl = parse_bucket(redis.call('HGET', hk, f))
  if b ~= cur_b then c, fl = 0, 0 end
  c = c + 1
  if not ok then fl = fl + 1 end
  redis.call('HSET', hk, f, cur_b .. ':' .. c .. ':' .. fl)
  local calls, fails = window_counts()
  if calls >= min_calls and fails >= ratio * calls - 1e-9 then return {trip()} end
  touch('closed')
  return {'closed'}
end

if op == 'peek' then
  local calls, fails, wait, n = 0, 0, 0, 0
  if state == 'closed' then
    calls, fails = window_counts()
  elseif state == 'open' and NOW < open_until then
    wait = open_until - NOW
  else
    if state == 'open' then h[4] = '{}' end
    state = 'half_open'
    local _, live_n, first = live_probes()
    n = live_n
    if n >= max_probes then wait = math.max(1, math.min(cool, first - NOW)) end
  end
  return {state, calls, fails, wait, n, gen}
end

return redis.error_reply('circuit.lua: unknown op ' .. tostring(op))
