-- Store new queued jobs, all or none, in order.
-- Per job i (0-based), KEYS[4i+1..4i+4]: its idempotency key (or the record key again when it has
-- none), its record, its tenant's listing, its lane's stream.
-- ARGV[1] = the consumer group; per job, ARGV[1+4i+1..4i+4]: has an idempotency key ("1"/"0"), id,
-- tenant, record JSON, and then created_at at ARGV[1+4n+i+1].
-- Returns per job "" when stored, or the id of the tenant's job that already has its key.
local n = #KEYS / 4
for i = 0, n - 1 do
  if redis.call('EXISTS', KEYS[4 * i + 2]) == 1 then
    return redis.error_reply('job id already stored: ' .. ARGV[1 + 4 * i + 2])
  end
end
local out = {}
for i = 0, n - 1 do
  local idem, record, listing, stream = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  local has_idem, id, tenant, json = ARGV[1 + 4 * i + 1], ARGV[1 + 4 * i + 2], ARGV[1 + 4 * i + 3], ARGV[1 + 4 * i + 4]
  local created_at = ARGV[1 + 4 * n + i + 1]
  local prior = false
  if has_idem == '1' then
    prior = redis.call('GET', idem)
    if not prior then
      redis.call('SET', idem, id)
    end
  end
  if prior then
    out[i + 1] = prior
  else
    local entry = redis.call('XADD', stream, '*', 'j', id, 't', tenant)
    redis.call('HSET', record, 'r', json, 'v', 1, 'e', entry)
    redis.call('ZADD', listing, created_at, id)
    out[i + 1] = ''
  end
end
return out
