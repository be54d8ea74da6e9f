-- Move retries that are due from the delayed set to the back of the pending list.
-- KEYS[1] delayed zset, KEYS[2] pending list
-- ARGV[1] now ms, ARGV[2] most ids to move
-- Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('LPUSH', KEYS[2], id)
end
return #due
