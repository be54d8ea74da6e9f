-- Give a lost worker's in-flight tasks back to the head of pending, if its heartbeat is gone.
-- Their run already counted as an attempt (fetch counts at start).
-- KEYS[1] heartbeat key of the lost worker, KEYS[2] its in-flight list, KEYS[3] pending list,
-- KEYS[4] workers set, KEYS[5] active zset
-- ARGV[1] the lost worker's id
-- Returns the number of tasks recovered, or -1 when the worker is alive after all.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
while true do
  local id = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT')
  if not id then break end
  redis.call('ZREM', KEYS[5], id)
  n = n + 1
end
redis.call('SREM', KEYS[4], ARGV[1])
return n
