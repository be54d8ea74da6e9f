-- Cancels the next page of a stopped batch's tasks (events.lua and fair.lua are prepended), as cancel.lua
-- cancels one: off every list but pending (fetch.lua drops a cancelled id when it comes up; an
-- LREM per id would scan the list once per task), the run's token cleared, a running call
-- aborted through the queue's cancel channel (and counted off the tenant's runs in flight, once:
-- the token's HDEL says whether there was one). ev_final counts each in the batch's `failed`.
-- Resumable: `ccur` in the batch hash is the next index, and cancelling a final task is a no-op.
-- KEYS[1] batch hash, KEYS[2] its task list, KEYS[3] delayed zset, KEYS[4] active zset,
-- KEYS[5] throttled zset, KEYS[6] waiting zset
-- ARGV[1] the queue's key base ('<prefix>:{<queue>}:'; task keys are ARGV[1] .. 'task:' .. id,
-- the same slot), ARGV[2] page size, ARGV[3] now ms, ARGV[4] result TTL seconds, ARGV[5] reason
-- Returns {next index, tasks in the list}.
local at = tonumber(redis.call('HGET', KEYS[1], 'ccur')) or 0
local ids = redis.call('LRANGE', KEYS[2], at, at + tonumber(ARGV[2]) - 1)
local ttl = tonumber(ARGV[4])
for _, id in ipairs(ids) do
  local tkey = ARGV[1] .. 'task:' .. id
  local t = redis.call('HMGET', tkey, 'status', 'worker', 'tenant')
  local st = t[1]
  if st and st ~= 'succeeded' and st ~= 'failed' and st ~= 'cancelled' then
    redis.call('HSET', tkey, 'status', 'cancelled', 'finished_at', ARGV[3], 'error', ARGV[5])
    if redis.call('HDEL', tkey, 'token') == 1 then fq_ended(ARGV[1] .. 'running', t[3]) end
    redis.call('HDEL', tkey, 'pending_tool_calls', 'waiting_until')
    redis.call('EXPIRE', tkey, ttl)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZREM', KEYS[6], id)
    if st == 'running' and t[2] then
      redis.call('LREM', ARGV[1] .. 'inflight:' .. t[2], 0, id)
      redis.call('PUBLISH', ARGV[1] .. 'cancels', id)
    end
    ev_final(tkey, 'cancelled', ttl, ARGV[5], nil, nil, nil, nil, false)
  end
end
at = at + #ids
redis.call('HSET', KEYS[1], 'ccur', at)
return {at, redis.call('LLEN', KEYS[2])}
