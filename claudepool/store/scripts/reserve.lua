-- Hold budget for one request, or say which limit refuses it. Atomic; the clock is Redis's.
--
-- KEYS[1] reservations ZSET (id -> expiry), KEYS[2] reservation amounts HASH (id -> USD),
-- KEYS[3] the amounts' sum HASH
-- ARGV[1] day spend key prefix (the script appends YYYYMMDD), ARGV[2] month spend key prefix (YYYYMM),
-- ARGV[3] reservation id, ARGV[4] amount USD, ARGV[5] daily limit, ARGV[6] monthly limit (0 = none),
-- ARGV[7] ttl seconds, ARGV[8] grace seconds the keys outlive their longest reservation,
-- ARGV[9] the least amount that will do ('' = the whole amount or nothing)
--
-- Holds the amount if it fits in the room every limit leaves (limit - spent - reserved), else, with
-- ARGV[9], that room if it is at least ARGV[9] and more than nothing: `grant` in store/base.py.
-- Returns {'ok', granted}, or {'daily'|'monthly', spent, reserved} (decimal strings) when refused.

local now, sec = now_s()

-- Expired reservations (expiry <= now) no longer hold budget.
res_expire(KEYS[1], KEYS[2], KEYS[3], now)

-- Live reservations, except this id: reserving again under the same id replaces, never doubles.
local previous = redis.call('HGET', KEYS[2], ARGV[3])
local reserved = res_total(KEYS[2], KEYS[3]) - (previous and tonumber(previous) or 0)
if reserved < 0 then reserved = 0 end

local amount = tonumber(ARGV[4])
local least = ARGV[9] ~= '' and tonumber(ARGV[9]) or nil
local day, month = utc_day_month(sec)
local checks = {
  {'daily', tonumber(ARGV[5]), ARGV[1] .. day},
  {'monthly', tonumber(ARGV[6]), ARGV[2] .. month},
}
local room, tightest, tightest_spent = math.huge, nil, nil
for _, check in ipairs(checks) do
  local limit = check[2]
  if limit > 0 then
    local spent = redis.call('GET', check[3]) or '0'
    local left = limit - tonumber(spent) - reserved
    if left < room then
      room, tightest, tightest_spent = left, check[1], spent
    end
  end
end
if amount > room then
  if least ~= nil and room >= least and room > 0 then
    amount = room
  else
    return {tightest, tightest_spent, fmt(reserved)}
  end
end

local ttl = tonumber(ARGV[7])
redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], fmt(amount))
res_set_total(KEYS[2], KEYS[3], reserved + amount)
local keep_ms = math.ceil((math.max(ttl, 0) + tonumber(ARGV[8])) * 1000)
for i = 1, 3 do
  if redis.call('PTTL', KEYS[i]) < keep_ms then
    redis.call('PEXPIRE', KEYS[i], string.format('%d', keep_ms))
  end
end
return {'ok', fmt(amount)}
