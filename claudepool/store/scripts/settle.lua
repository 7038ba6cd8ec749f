-- Settle one turn, once: drop its reservation, add its cost and usage to its day and month, append
-- it to the ledger and list the tenant. Atomic; a record id settled before changes nothing.
--
-- KEYS[1] settled ids ZSET, KEYS[2] reservations ZSET, KEYS[3] reservation amounts HASH,
-- KEYS[4] day spend, KEYS[5] month spend, KEYS[6] day usage HASH, KEYS[7] month usage HASH,
-- KEYS[8] ledger STREAM, KEYS[9] global tenants SET
-- ARGV[1] record id, ARGV[2] '1' if the record settles a reservation else '0', ARGV[3] reservation id,
-- ARGV[4] tenant, ARGV[5] record JSON, ARGV[6] ledger max length (approximate),
-- ARGV[7] day TTL s, ARGV[8] month TTL s, ARGV[9] settled-id memory s,
-- ARGV[10..21] six (usage hash field, increment) pairs; the last pair is the cost (a float)
--
-- Returns 1 if settled now, 0 if this record id was settled before.

local now = now_s()
local remember = tonumber(ARGV[9])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now - remember))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], fmt(now), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[9])

if ARGV[2] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HDEL', KEYS[3], ARGV[3])
end

-- Costs go in as the client's exact decimal string and are summed by Redis in long double.
local cost = ARGV[21]
local buckets = {{KEYS[4], KEYS[6], ARGV[7]}, {KEYS[5], KEYS[7], ARGV[8]}}
for _, b in ipairs(buckets) do
  redis.call('INCRBYFLOAT', b[1], cost)
  redis.call('EXPIRE', b[1], b[3])
  for i = 10, 18, 2 do
    redis.call('HINCRBY', b[2], ARGV[i], ARGV[i + 1])
  end
  redis.call('HINCRBYFLOAT', b[2], ARGV[20], cost)
  redis.call('EXPIRE', b[2], b[3])
end

redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[6], '*', 'r', ARGV[5])
redis.call('SADD', KEYS[9], ARGV[4])
return 1
