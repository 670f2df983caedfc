-- budget.lua: reserve or release part of a run's shared budget, atomically.
-- Reservation before spending (not accounting after it) is what lets two nodes on two
-- workers race for the last of a budget without both winning: a call reserves its worst
-- case (input tokens + max output tokens, and their cost) before it starts, extends the
-- reservation if a stream runs past it, and record_step.lua settles it with the actual
-- usage. Reservations expire (ARGV[7]) so a dead worker's reservation frees itself.
-- KEYS[1] run hash (used: tokens_in, tokens_out, cost_usd; reserved: res_in, res_out, res_cost)
-- KEYS[2] the run's reservations hash
-- ARGV[2] op: "reserve" (create or extend) or "release"
-- ARGV[3] reservation id ("<nid>#<attempt>#<seq>")
-- ARGV[4] input tokens to add   ARGV[5] output tokens to add   ARGV[6] USD to add
-- ARGV[7] time to live in ms
-- ARGV[8] limits: JSON object with any of max_tokens, max_input_tokens,
--          max_output_tokens, max_cost_usd
-- Returns {1} when reserved (or released, or the run is gone), {0, rule, limit, would_reach} when the
-- reservation would cross a limit (nothing reserved).
local rk, resk, op, id = KEYS[1], KEYS[2], ARGV[2], ARGV[3]
if op == 'release' then
  drop_reservation(rk, resk, id)
  return {1}
end
-- A run that no longer exists (pruned) gets no keys back; the caller's next fenced
-- write is rejected anyway.
if redis.call('EXISTS', rk) == 0 then return {1} end

-- purge reservations of attempts that died
local all = redis.call('HGETALL', resk)
for i = 1, #all, 2 do
  local _, _, _, exp = parse_reservation(all[i + 1])
  if exp < NOW then drop_reservation(rk, resk, all[i]) end
end

local add_in, add_out, add_cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local r = redis.call('HMGET', rk, 'tokens_in', 'tokens_out', 'cost_usd', 'res_in', 'res_out', 'res_cost')
local used_in, used_out, used_cost = tonumber(r[1] or '0'), tonumber(r[2] or '0'), tonumber(r[3] or '0')
local res_in, res_out, res_cost = tonumber(r[4] or '0'), tonumber(r[5] or '0'), tonumber(r[6] or '0')
local lim = cjson.decode(ARGV[8])
local checks = {
  {'max_tokens', used_in + used_out + res_in + res_out + add_in + add_out},
  {'max_input_tokens', used_in + res_in + add_in},
  {'max_output_tokens', used_out + res_out + add_out},
  {'max_cost_usd', used_cost + res_cost + add_cost},
}
for _, c in ipairs(checks) do
  local l = lim[c[1]]
  if l and l ~= cjson.null and c[2] > l then
    return {0, c[1], tostring(l), tostring(c[2])}
  end
end

local tin, tout, cost = add_in, add_out, add_cost
local prev = redis.call('HGET', resk, id)
if prev then
  local pin, pout, pcost = parse_reservation(prev)
  tin, tout, cost = tin + pin, tout + pout, cost + pcost
end
redis.call('HSET', resk, id, string.format('%d %d %.10f %d', tin, tout, cost, NOW + tonumber(ARGV[7])))
redis.call('HINCRBY', rk, 'res_in', add_in)
redis.call('HINCRBY', rk, 'res_out', add_out)
redis.call('HINCRBYFLOAT', rk, 'res_cost', string.format('%.10f', add_cost))
return {1}
