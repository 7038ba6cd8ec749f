-- Spend today and this month (by Redis's clock) and the sum of live reservations. Read-only.
--
-- KEYS[1] reservations ZSET, KEYS[2] reservation amounts HASH
-- ARGV[1] day spend key prefix, ARGV[2] month spend key prefix
-- Returns {day spent, month spent, reserved} as decimal strings.

local now, sec = now_s()
local day, month = utc_day_month(sec)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. fmt(now), '+inf')
local reserved = 0
for _, amount in ipairs(chunked('HMGET', KEYS[2], live)) do
  if amount then reserved = reserved + tonumber(amount) end
end
return {redis.call('GET', ARGV[1] .. day) or '0', redis.call('GET', ARGV[2] .. month) or '0', fmt(reserved)}
