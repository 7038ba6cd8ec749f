-- Prepended to every script by claudepool/store/redis.py: the clock, read inside Redis so every
-- daemon sharing this Redis agrees on "now", "today" and "this month", and exact number formatting.

-- Lua's tostring() and redis.call()'s number conversion keep only 14 significant digits: format
-- every float we hand back to Redis ourselves.
local function fmt(x)
  return string.format('%.17g', x)
end

-- Unix time as a float, and its whole seconds.
local function now_s()
  local t = redis.call('TIME')
  local sec = tonumber(t[1])
  return sec + tonumber(t[2]) / 1e6, sec
end

-- Howard Hinnant's civil_from_days: days since 1970-01-01 -> proleptic Gregorian year, month, day.
-- http://howardhinnant.github.io/date_algorithms.html#civil_from_days (floor division throughout).
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097                                                  -- [0, 146096]
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)                                          -- [0, 399]
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))   -- [0, 365]
  local mp = math.floor((5 * doy + 2) / 153)                                    -- [0, 11]
  local d = doy - math.floor((153 * mp + 2) / 5) + 1                            -- [1, 31]
  local m = mp < 10 and mp + 3 or mp - 9                                        -- [1, 12]
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- The UTC day (YYYYMMDD) and month (YYYYMM) keys of a unix time, as base.day_key/month_key.
local function utc_day_month(sec)
  local y, m, d = civil_from_days(math.floor(sec / 86400))
  return string.format('%04d%02d%02d', y, m, d), string.format('%04d%02d', y, m)
end

-- HDEL/HMGET with many fields, in chunks that stay below Lua's unpack() stack limit.
local function chunked(command, key, fields)
  local out = {}
  for i = 1, #fields, 1000 do
    local part = redis.call(command, key, unpack(fields, i, math.min(i + 999, #fields)))
    if type(part) == 'table' then
      for _, v in ipairs(part) do out[#out + 1] = v end
    end
  end
  return out
end
