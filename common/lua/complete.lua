-- Record a task's result, once. The first final state wins: a duplicate run's result is dropped.
-- KEYS[1] task hash, KEYS[2] worker in-flight list, KEYS[3] active zset, KEYS[4] agent memory list (optional)
-- ARGV[1] id, ARGV[2] now ms, ARGV[3] result JSON, ARGV[4] result TTL seconds,
-- ARGV[5] memory length cap, ARGV[6] memory TTL seconds, ARGV[7..] messages to append to memory
-- Returns 'ok', or the state that made the result moot: 'duplicate', 'cancelled', 'failed', 'missing'.
-- -1: search from the tail, where the oldest ids (the ones finishing now) sit; LMOVE adds at the head
redis.call('LREM', KEYS[2], -1, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'succeeded' then return 'duplicate' end
if status == 'cancelled' or status == 'failed' then return status end
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'result', ARGV[3], 'finished_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'error')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
if #KEYS == 4 and #ARGV > 6 then
  for i = 7, #ARGV do
    redis.call('RPUSH', KEYS[4], ARGV[i])
  end
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[5]), -1)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[6]))
end
return 'ok'
