-- Drop a reservation without spending. KEYS[1] reservations ZSET, KEYS[2] amounts HASH; ARGV[1] id.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
