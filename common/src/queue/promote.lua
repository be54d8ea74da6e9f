-- Move due work back to pending: retries whose backoff is over (to the back, behind work that was
-- waiting), and tasks the flow limiter parked whose turn has come (to the head: they were taken
-- once already, and their turn is now).
-- KEYS[1] delayed zset, KEYS[2] pending list, KEYS[3] throttled zset
-- ARGV[1] now ms, ARGV[2] most ids to move from each set
-- Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('LPUSH', KEYS[2], id)
end
local turn = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(turn) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('RPUSH', KEYS[2], id)
end
return #due + #turn
