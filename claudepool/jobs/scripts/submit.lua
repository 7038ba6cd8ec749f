-- Store new queued jobs, all or none, in order.
-- Per job i (0-based), KEYS[5i+1..5i+5]: its idempotency key (or the record key again when it has
-- none), its record, its tenant's listing, its lane's stream, its tenant's count of open jobs.
-- ARGV[1] = the consumer group, ARGV[2] = the most open jobs a tenant may have (0: no bound); per
-- job, ARGV[2+4i+1..4i+4]: has an idempotency key ("1"/"0"), id, tenant, record JSON, and then
-- created_at at ARGV[2+4n+i+1].
-- Returns per job "" when stored, or the id of the tenant's job that already has its key; or the
-- error "too_many_jobs <open>" and nothing stored when a tenant would pass the bound.
local n = #KEYS / 5
local max_open = tonumber(ARGV[2])
for i = 0, n - 1 do
  if redis.call('EXISTS', KEYS[5 * i + 2]) == 1 then
    return redis.error_reply('job id already stored: ' .. ARGV[2 + 4 * i + 2])
  end
end
-- First what would be stored (an idempotency key seen earlier in this call counts as stored).
local prior, seen, adding = {}, {}, {}
for i = 0, n - 1 do
  local idem = KEYS[5 * i + 1]
  if ARGV[2 + 4 * i + 1] == '1' then
    prior[i] = redis.call('GET', idem) or seen[idem]
    if not prior[i] then
      seen[idem] = ARGV[2 + 4 * i + 2]
    end
  end
  if not prior[i] then
    local open = KEYS[5 * i + 5]
    adding[open] = (adding[open] or 0) + 1
  end
end
if max_open > 0 then
  for open, count in pairs(adding) do
    local now = tonumber(redis.call('GET', open) or '0')
    if now + count > max_open then
      return redis.error_reply('too_many_jobs ' .. (now + count))
    end
  end
end
local out = {}
for i = 0, n - 1 do
  local idem, record, listing, stream, open = KEYS[5 * i + 1], KEYS[5 * i + 2], KEYS[5 * i + 3], KEYS[5 * i + 4],
    KEYS[5 * i + 5]
  local id, tenant, json = ARGV[2 + 4 * i + 2], ARGV[2 + 4 * i + 3], ARGV[2 + 4 * i + 4]
  local created_at = ARGV[2 + 4 * n + i + 1]
  if prior[i] then
    out[i + 1] = prior[i]
  else
    if ARGV[2 + 4 * i + 1] == '1' then
      redis.call('SET', idem, id)
    end
    local entry = redis.call('XADD', stream, '*', 'j', id, 't', tenant)
    redis.call('HSET', record, 'r', json, 'v', 1, 'e', entry)
    redis.call('ZADD', listing, created_at, id)
    redis.call('INCR', open)
    out[i + 1] = ''
  end
end
return out
