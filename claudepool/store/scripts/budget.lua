-- Spend today and this month (by Redis's clock) and the sum of live reservations. Expired
-- reservations are dropped on the way, as a reserve would.
--
-- KEYS[1] reservations ZSET, KEYS[2] reservation amounts HASH, KEYS[3] amounts' sum HASH
-- ARGV[1] day spend key prefix, ARGV[2] month spend key prefix
-- Returns {day spent, month spent, reserved} as decimal strings.

local now, sec = now_s()
local day, month = utc_day_month(sec)
res_expire(KEYS[1], KEYS[2], KEYS[3], now)
local reserved = res_total(KEYS[2], KEYS[3])
return {redis.call('GET', ARGV[1] .. day) or '0', redis.call('GET', ARGV[2] .. month) or '0', fmt(reserved)}
