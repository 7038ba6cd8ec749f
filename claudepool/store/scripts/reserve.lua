-- Hold budget for one request, or say which limit refuses it. Atomic; the clock is Redis's.
--
-- KEYS[1] reservations ZSET (id -> expiry), KEYS[2] reservation amounts HASH (id -> USD),
-- KEYS[3] the amounts' sum HASH
-- ARGV[1] day spend key prefix (the script appends YYYYMMDD), ARGV[2] month spend key prefix (YYYYMM),
-- ARGV[3] reservation id, ARGV[4] amount USD, ARGV[5] daily limit, ARGV[6] monthly limit (0 = none),
-- ARGV[7] ttl seconds, ARGV[8] grace seconds the keys outlive their longest reservation
--
-- Returns {'ok'}, or {'daily'|'monthly', spent, reserved} (decimal strings) when refused.

local now, sec = now_s()

-- Expired reservations (expiry <= now) no longer hold budget.
res_expire(KEYS[1], KEYS[2], KEYS[3], now)

-- Live reservations, except this id: reserving again under the same id replaces, never doubles.
local previous = redis.call('HGET', KEYS[2], ARGV[3])
local reserved = res_total(KEYS[2], KEYS[3]) - (previous and tonumber(previous) or 0)
if reserved < 0 then reserved = 0 end

local amount = tonumber(ARGV[4])
local day, month = utc_day_month(sec)
local checks = {
  {'daily', tonumber(ARGV[5]), ARGV[1] .. day},
  {'monthly', tonumber(ARGV[6]), ARGV[2] .. month},
}
for _, check in ipairs(checks) do
  local limit = check[2]
  if limit > 0 then
    local spent = redis.call('GET', check[3]) or '0'
    if tonumber(spent) + reserved + amount > limit then
      return {check[1], spent, fmt(reserved)}
    end
  end
end

local ttl = tonumber(ARGV[7])
redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
res_set_total(KEYS[2], KEYS[3], reserved + amount)
local keep_ms = math.ceil((math.max(ttl, 0) + tonumber(ARGV[8])) * 1000)
for i = 1, 3 do
  if redis.call('PTTL', KEYS[i]) < keep_ms then
    redis.call('PEXPIRE', KEYS[i], string.format('%d', keep_ms))
  end
end
return {'ok'}
