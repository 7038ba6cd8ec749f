-- Settle one turn, once: drop its reservation, add its cost and usage to its day and month, and
-- append it to the ledger. Atomic; a record id settled before changes nothing. Every key is the
-- tenant's (one hash slot); the caller lists the tenant in the global set before, by itself.
--
-- KEYS[1] settled ids ZSET, KEYS[2] reservations ZSET, KEYS[3] reservation amounts HASH,
-- KEYS[4] the amounts' sum HASH, KEYS[5] day spend, KEYS[6] month spend, KEYS[7] day usage HASH,
-- KEYS[8] month usage HASH, KEYS[9] ledger STREAM
-- ARGV[1] record id, ARGV[2] '1' if the record settles a reservation else '0', ARGV[3] reservation id,
-- ARGV[4] record JSON, ARGV[5] ledger max length (approximate),
-- ARGV[6] day TTL s, ARGV[7] month TTL s, ARGV[8] settled-id memory s, ARGV[9] settled ids kept at most,
-- ARGV[10..21] six (usage hash field, increment) pairs; the last pair is the cost (a float)
--
-- Returns 1 if settled now, 0 if this record id was settled before.

local now = now_s()
local remember = tonumber(ARGV[8])

-- Forget ids by age, then beyond the newest ARGV[9]: each settle drops what it pushed out, so the
-- set (and this script's work) stays bounded however long the tenant keeps settling.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now - remember))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], fmt(now), ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[9]) + 1))
redis.call('EXPIRE', KEYS[1], ARGV[8])

if ARGV[2] == '1' then
  res_drop(KEYS[2], KEYS[3], KEYS[4], {ARGV[3]})
end

-- Costs go in as the client's exact decimal string and are summed by Redis in long double.
local cost = ARGV[21]
local buckets = {{KEYS[5], KEYS[7], ARGV[6]}, {KEYS[6], KEYS[8], ARGV[7]}}
for _, b in ipairs(buckets) do
  redis.call('INCRBYFLOAT', b[1], cost)
  redis.call('EXPIRE', b[1], b[3])
  for i = 10, 18, 2 do
    redis.call('HINCRBY', b[2], ARGV[i], ARGV[i + 1])
  end
  redis.call('HINCRBYFLOAT', b[2], ARGV[20], cost)
  redis.call('EXPIRE', b[2], b[3])
end

redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[5], '*', 'r', ARGV[4])
return 1
