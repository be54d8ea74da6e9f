-- Record a run's result, once, and only if that run still owns the task.
-- KEYS[1] task hash, KEYS[2] worker in-flight list, KEYS[3] active zset, KEYS[4] agent memory list (optional)
-- ARGV[1] id, ARGV[2] run token, ARGV[3] now ms, ARGV[4] result JSON, ARGV[5] result TTL seconds,
-- ARGV[6] memory length cap, ARGV[7] memory TTL seconds, ARGV[8..] messages to append to memory
-- Returns 'ok'; or, writing nothing: the verdict this run already got (a resend after a lost reply),
-- the final status ('succeeded', 'failed', 'cancelled'), 'missing', or 'stale' (another run owns it).
local t = redis.call('HMGET', KEYS[1], 'status', 'token', 'reported')
local status = t[1]
if not status then
  redis.call('LREM', KEYS[2], -1, ARGV[1])
  return 'missing'
end
local token = ARGV[2]
if t[2] ~= token then
  local prefix = token .. '|'
  if t[3] and string.sub(t[3], 1, #prefix) == prefix then return string.sub(t[3], #prefix + 1) end
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
  redis.call('HINCRBY', KEYS[1], 'fenced', 1)
  return 'stale'
end
-- -1: search from the tail, where the oldest ids (the ones finishing now) sit; LMOVE adds at the head
if redis.call('LREM', KEYS[2], -1, ARGV[1]) == 0 then
  -- the token matches but the id is not in this worker's list: not this run's to write
  redis.call('HINCRBY', KEYS[1], 'fenced', 1)
  return 'stale'
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'result', ARGV[4], 'finished_at', ARGV[3],
  'reported', token .. '|ok')
redis.call('HDEL', KEYS[1], 'error', 'token')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
if #KEYS == 4 and #ARGV > 7 then
  for i = 8, #ARGV do
    redis.call('RPUSH', KEYS[4], ARGV[i])
  end
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[6]), -1)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[7]))
end
return 'ok'
