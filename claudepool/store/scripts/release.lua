-- Drop a reservation without spending.
-- KEYS[1] reservations ZSET, KEYS[2] amounts HASH, KEYS[3] amounts' sum HASH; ARGV[1] id.
res_drop(KEYS[1], KEYS[2], KEYS[3], {ARGV[1]})
return 1
