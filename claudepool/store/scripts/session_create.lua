-- Store a new session record unless the tenant already has max_open open sessions. Atomic. Both keys
-- are the tenant's (one hash slot); the caller lists the tenant in the global set before, by itself.
--
-- KEYS[1] sessions HASH (id -> record JSON), KEYS[2] open session ids SET
-- ARGV[1] session id, ARGV[2] record JSON, ARGV[3] max open sessions (0 = no bound)
--
-- Returns 1 when stored, 0 when refused.

local max_open = tonumber(ARGV[3])
if max_open > 0 and redis.call('SCARD', KEYS[2]) >= max_open then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
