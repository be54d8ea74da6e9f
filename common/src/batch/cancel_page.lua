-- Cancels the next page of a stopped batch's tasks (events.lua and fair.lua are prepended), as cancel.lua
-- cancels one: off every list but pending (fetch.lua drops a cancelled id when it comes up; an
-- LREM per id would scan the list once per task), the run's token cleared, a running call
-- aborted through the queue's cancel channel (and counted off the tenant's runs in flight, once:
-- the token's HDEL says whether there was one). ev_final counts each in the batch's `failed`.
-- Resumable: `ccur` in the batch hash is the next index, and cancelling a final task is a no-op.
-- KEYS[1] batch hash, KEYS[2] its task list, KEYS[3] delayed zset, KEYS[4] active zset,
-- KEYS[5] throttled zset, KEYS[6] waiting zset, KEYS[7] the queue's `running` hash, then each
-- task's record and stream (the caller read the page, batch/mod.rs)
-- ARGV[1] the index the caller read the page from, ARGV[2] the queue's cancel channel, ARGV[3]
-- now ms, ARGV[4] result TTL seconds, ARGV[5] reason, ARGV[6..] the page's task ids
-- A page read at another index than `ccur` now does nothing (the caller reads again). A running
-- task's owner drops its in-flight copy when it hears of the cancel (cancel.lua says how).
-- Returns {next index, tasks in the list}.
local at = tonumber(redis.call('HGET', KEYS[1], 'ccur')) or 0
if at ~= tonumber(ARGV[1]) then return {at, redis.call('LLEN', KEYS[2])} end
-- the queue's key base, '<prefix>:{<queue>}:', from the delayed key's name
local base = string.match(KEYS[3], '^(.*)delayed$')
local ttl = tonumber(ARGV[4])
for i = 6, #ARGV do
  local id = ARGV[i]
  local tkey = base .. 'task:' .. id
  local t = redis.call('HMGET', tkey, 'status', 'tenant')
  local st = t[1]
  if st and st ~= 'succeeded' and st ~= 'failed' and st ~= 'cancelled' then
    redis.call('HSET', tkey, 'status', 'cancelled', 'finished_at', ARGV[3], 'error', ARGV[5])
    if redis.call('HDEL', tkey, 'token') == 1 then fq_ended(KEYS[7], t[2]) end
    redis.call('HDEL', tkey, 'pending_tool_calls', 'waiting_until')
    redis.call('EXPIRE', tkey, ttl)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZREM', KEYS[6], id)
    if st == 'running' then redis.call('PUBLISH', ARGV[2], id) end
    ev_final(tkey, 'cancelled', ttl, ARGV[5], nil, nil, nil, nil, false)
  end
end
at = at + #ARGV - 5
redis.call('HSET', KEYS[1], 'ccur', at)
return {at, redis.call('LLEN', KEYS[2])}
