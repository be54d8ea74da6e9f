-- Cancel a task that has not finished. A running task's worker sees 'cancelled' when it reports
-- and drops its result; a queued or retrying one is taken off the lists now.
-- KEYS[1] task hash, KEYS[2] pending list, KEYS[3] delayed zset
-- ARGV[1] id, ARGV[2] now ms, ARGV[3] result TTL seconds
-- Returns 'ok' when cancelled now, 'missing', or the final status the task already had.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 'ok'
