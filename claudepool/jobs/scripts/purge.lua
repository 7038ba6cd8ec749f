-- Delete up to ARGV[2] ended jobs that finished before ARGV[1], with their idempotency keys, their
-- entries in their tenant's listing and in the dead letters.
-- KEYS: the ZSET of ended records (record key -> finished_at), the dead-letter stream.
-- ARGV[3] is the key prefix: a tenant's listing and idempotency keys are named from it here, since
-- which tenants the page holds is known only once it is read (one Redis; no cluster).
-- Returns how many members of the ZSET it handled (fewer than ARGV[2]: nothing more to purge).
local ended, dead, prefix = KEYS[1], KEYS[2], ARGV[3]
local members = redis.call('ZRANGEBYSCORE', ended, '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local purged = 0
for _, record in ipairs(members) do
  local fields = redis.call('HMGET', record, 'r', 'd')
  if fields[1] then
    local job = cjson.decode(fields[1])
    local tenant_prefix = prefix .. '{' .. job['tenant'] .. '}:'
    local key = job['idempotency_key']
    if type(key) == 'string' then
      local idem = tenant_prefix .. 'idem:' .. key
      if redis.call('GET', idem) == job['id'] then
        redis.call('DEL', idem)
      end
    end
    redis.call('ZREM', tenant_prefix .. 'list', job['id'])
    if fields[2] then
      redis.call('XDEL', dead, fields[2])
    end
    redis.call('DEL', record)
    purged = purged + 1
  end
  redis.call('ZREM', ended, record)
end
return {#members, purged}
