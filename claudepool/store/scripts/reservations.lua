-- Prepended (after clock.lua) to every script by claudepool/store/redis.py: one tenant's
-- reservations, kept in step across three keys: a ZSET (id -> expiry), a HASH (id -> amount) and a
-- HASH holding how many amounts it sums (``n``) and their sum (``usd``), so a reserve reads one
-- number instead of adding up every reservation the tenant holds. Each change adds or subtracts one
-- amount. The sum is reset to 0 whenever nothing is held (rounding cannot outlive the reservations),
-- never goes below 0 (no amount is negative), and is counted afresh from the amounts when its count
-- disagrees with theirs (reservations written by a daemon that keeps no sum, during an upgrade) or
-- when it is no longer finite. Expired reservations go once each: amortised O(log n) per call.

-- The sum of the amounts held.
local function res_total(amounts, total_key)
  local kept = redis.call('HMGET', total_key, 'n', 'usd')
  if kept[1] and tonumber(kept[1]) == redis.call('HLEN', amounts) then
    return tonumber(kept[2])
  end
  local sum = 0
  for _, amount in ipairs(redis.call('HVALS', amounts)) do
    sum = sum + tonumber(amount)
  end
  return sum
end

-- Store the sum of what the amounts hash holds now, living as long as that hash.
local function res_set_total(amounts, total_key, value)
  local held = redis.call('HLEN', amounts)
  redis.call('DEL', total_key)
  if held == 0 then
    return
  end
  if value ~= value or value == math.huge or value == -math.huge then
    value = res_total(amounts, total_key)  -- no sum kept: counted afresh
  end
  if value < 0 then value = 0 end
  redis.call('HSET', total_key, 'n', held, 'usd', fmt(value))
  local keep_ms = redis.call('PTTL', amounts)
  if keep_ms > 0 then
    redis.call('PEXPIRE', total_key, keep_ms)
  end
end

-- Drop the reservations ``ids`` (unknown ones are ignored) and their share of the sum.
local function res_drop(res, amounts, total_key, ids)
  if #ids == 0 then return end
  local total = res_total(amounts, total_key)
  for _, amount in ipairs(chunked('HMGET', amounts, ids)) do
    if amount then total = total - tonumber(amount) end
  end
  chunked('ZREM', res, ids)
  chunked('HDEL', amounts, ids)
  res_set_total(amounts, total_key, total)
end

-- Drop every reservation whose expiry is at or before ``now``.
local function res_expire(res, amounts, total_key, now)
  res_drop(res, amounts, total_key, redis.call('ZRANGEBYSCORE', res, '-inf', fmt(now)))
end
