-- A tenant's sliding rate-limit windows: check a request against both limits and count it, or
-- record a settled turn's tokens. Atomic; the clock is Redis's, so every daemon agrees on "now".
-- The same algorithm as claudepool/tenancy/limits.py `LocalWindows` (read its docstring).
--
-- KEYS[1] requests HASH, KEYS[2] tokens HASH (sub-bucket index -> count)
-- ARGV[1] 'check' | 'record', ARGV[2] bucket width (microseconds), ARGV[3] buckets per window (n)
-- check:  ARGV[4] requests limit, ARGV[5] tokens limit (0 = none)
--         returns {'ok'}, or {'requests_per_minute'|'tokens_per_minute', used, wait_us} when refused
-- record: ARGV[4] tokens; returns {'ok'}
--
-- A window is the n + 1 newest buckets (the current one included): always at least n buckets of
-- time, so nothing admitted within the last window is ever forgotten.

local width = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local current = math.floor(now_us / width)
local oldest = current - n
-- One window and two buckets: a tenant that stops sending leaves nothing behind for long.
local keep_ms = string.format('%d', math.ceil((n + 2) * width / 1000))

-- The live buckets of one window, oldest first, and their total; deletes buckets out of the window.
local function window(key)
  local raw = redis.call('HGETALL', key)
  local live, stale, used = {}, {}, 0
  for i = 1, #raw, 2 do
    local index, count = tonumber(raw[i]), tonumber(raw[i + 1])
    if index < oldest then
      stale[#stale + 1] = raw[i]
    else
      live[#live + 1] = {index, count}
      used = used + count
    end
  end
  if #stale > 0 then chunked('HDEL', key, stale) end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  return live, used
end

-- Microseconds until enough of the oldest buckets leave the window to free ``excess``.
local function wait_us(live, excess)
  local freed = 0
  for _, bucket in ipairs(live) do
    freed = freed + bucket[2]
    if freed >= excess then
      return (bucket[1] + n + 1) * width - now_us
    end
  end
  return width
end

local function add(key, count)
  redis.call('HINCRBY', key, string.format('%d', current), count)
  redis.call('PEXPIRE', key, keep_ms)
end

if ARGV[1] == 'record' then
  local tokens = tonumber(ARGV[4])
  if tokens > 0 then
    window(KEYS[2])
    add(KEYS[2], tokens)
  end
  return {'ok'}
end

local requests_limit, tokens_limit = tonumber(ARGV[4]), tonumber(ARGV[5])
-- Tokens first: a request the token limit refuses takes no request from the window.
if tokens_limit > 0 then
  local live, used = window(KEYS[2])
  if used >= tokens_limit then
    return {'tokens_per_minute', used, wait_us(live, used - tokens_limit + 1)}
  end
end
if requests_limit > 0 then
  local live, used = window(KEYS[1])
  if used + 1 > requests_limit then
    return {'requests_per_minute', used, wait_us(live, used + 1 - requests_limit)}
  end
  add(KEYS[1], 1)
end
return {'ok'}
