-- Write a job's record back if nobody moved it since it was read (its version is unchanged), and do
-- what the move means for its stream entry, atomically with it.
-- KEYS: the record, its lane's stream, the dead-letter stream, the ZSET of ended records, its
-- tenant's count of open jobs.
-- ARGV: the version read, the new record JSON, the action, the consumer group, the consumer,
-- finished_at, the job's id, its tenant.
-- Actions: "keep" (only the record), "touch" (a heartbeat: the claim holder's entry becomes idle 0,
-- so no XAUTOCLAIM takes it), "end" (ack and delete the entry, note when it ended, for purge),
-- "dead" (as "end", and add the job to the dead letters).
-- Returns 1 when written, 0 when the version moved (the caller reads again or gives up).
local record, stream, dead, ended, open = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local version = redis.call('HGET', record, 'v')
if version ~= ARGV[1] then
  return 0
end
local action, group = ARGV[3], ARGV[4]
redis.call('HSET', record, 'r', ARGV[2], 'v', tonumber(version) + 1)
local entry = redis.call('HGET', record, 'e')
if action == 'touch' then
  redis.call('XCLAIM', stream, group, ARGV[5], 0, entry, 'JUSTID')
elseif action == 'end' or action == 'dead' then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  redis.call('ZADD', ended, ARGV[6], record)
  if redis.call('DECR', open) <= 0 then
    redis.call('DEL', open)  -- nothing open (or jobs stored before the count existed): no key left
  end
  if action == 'dead' then
    local letter = redis.call('XADD', dead, '*', 'j', ARGV[7], 't', ARGV[8])
    redis.call('HSET', record, 'd', letter)
  end
end
return 1
