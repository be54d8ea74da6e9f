-- A run did not succeed: retry later, dead-letter, or give the task back.
-- KEYS[1] task hash, KEYS[2] worker in-flight list, KEYS[3] active zset, KEYS[4] delayed zset,
-- KEYS[5] dead zset, KEYS[6] pending list
-- ARGV[1] id, ARGV[2] now ms, ARGV[3] mode, ARGV[4] error text, ARGV[5] retry at (ms),
-- ARGV[6] result TTL seconds, ARGV[7] rate-limit cap
-- Modes: 'transient' retry while attempts remain; 'rate_limited' retry without using an attempt,
-- up to the rate-limit cap; 'permanent' dead-letter now; 'giveback' back to the head of pending
-- without counting the attempt (drain deadline).
-- Returns the new status ('retrying', 'failed', 'queued') or the final state that was already there.
local id = ARGV[1]
local now = tonumber(ARGV[2])
local mode = ARGV[3]
redis.call('LREM', KEYS[2], -1, id) -- from the tail, where the oldest in-flight ids sit
redis.call('ZREM', KEYS[3], id)
local t = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'max_attempts', 'rate_limited')
local status = t[1]
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
local attempts = tonumber(t[2]) or 0
local max = tonumber(t[3]) or 1
local limited = tonumber(t[4]) or 0

local function bury(reason)
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', reason, 'finished_at', now)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
  redis.call('ZADD', KEYS[5], now, id)
  -- dead entries are kept as long as finished task records, so the set does not grow forever
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[6]) * 1000)
  return 'failed'
end

local function later()
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'error', ARGV[4])
  redis.call('ZADD', KEYS[4], tonumber(ARGV[5]), id)
  return 'retrying'
end

if mode == 'giveback' then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
  redis.call('RPUSH', KEYS[6], id)
  return 'queued'
elseif mode == 'permanent' then
  return bury(ARGV[4])
elseif mode == 'rate_limited' then
  limited = limited + 1
  redis.call('HSET', KEYS[1], 'attempts', math.max(attempts - 1, 0), 'rate_limited', limited)
  if limited >= tonumber(ARGV[7]) then
    return bury('rate limited ' .. limited .. ' times: ' .. ARGV[4])
  end
  return later()
else
  if attempts >= max then
    return bury(ARGV[4])
  end
  return later()
end
