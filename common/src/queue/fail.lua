-- A run did not succeed: retry later, dead-letter, or give the task back; only if that run still
-- owns the task.
-- KEYS[1] task hash, KEYS[2] worker in-flight list, KEYS[3] active zset, KEYS[4] delayed zset,
-- KEYS[5] dead zset, KEYS[6] pending list (tickets; the tenant's line is built from it, fair.lua),
-- KEYS[7] throttled zset, KEYS[8] the queue's `running` hash (runs in flight per tenant)
-- ARGV[1] id, ARGV[2] run token, ARGV[3] now ms, ARGV[4] mode, ARGV[5] error text,
-- ARGV[6] retry delay (ms), ARGV[7] result TTL seconds, ARGV[8] rate-limit cap
-- Modes: 'transient' retry while attempts remain; 'rate_limited' retry without using an attempt,
-- up to the rate-limit cap; 'permanent' dead-letter now; 'giveback' back to the head of pending
-- without counting the attempt (drain deadline); 'throttled' the flow limiter could not admit the
-- call: back to 'queued' without counting the attempt, parked in the throttled set until ARGV[6]
-- (an absolute time in ms for this mode), never buried.
-- Returns the new status ('retrying', 'failed', 'queued'); or, writing nothing: the verdict this run
-- already got (a resend after a lost reply), the final status, 'missing', or 'stale'.
local id = ARGV[1]
local token = ARGV[2]
local now = tonumber(ARGV[3])
local mode = ARGV[4]
local t = redis.call('HMGET', KEYS[1], 'status', 'token', 'reported', 'attempts', 'max_attempts', 'rate_limited', 'tenant')
local refused = fence(KEYS[1], KEYS[2], id, token, t[1], t[2], t[3])
if refused then return refused end
-- every way out of here writes an event; the stream is turned on first, while `attempts` is still
-- the run's (the uncounted modes give it back below), so a late follower sees this run's start
ev_on(KEYS[1], t[4])
redis.call('ZREM', KEYS[3], id)
-- the fence saw this run's token on the record: removing it ends the run
redis.call('HDEL', KEYS[1], 'token')
fq_ended(KEYS[8], t[7])
local attempts = tonumber(t[4]) or 0
local max = tonumber(t[5]) or 1
local limited = tonumber(t[6]) or 0
local ttl = tonumber(ARGV[7])

local function done(verdict)
  redis.call('HSET', KEYS[1], 'reported', token .. '|' .. verdict)
  return verdict
end

local function bury(reason)
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', reason, 'finished_at', now)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[5], now, id)
  -- dead entries are kept as long as finished task records, so the set does not grow forever
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - ttl * 1000)
  ev_final(KEYS[1], 'failed', ttl, reason)
  wf().final(KEYS[1], 'failed', nil, reason, now)
  return done('failed')
end

local function later()
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'error', ARGV[5])
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), id)
  ev_status(KEYS[1], 'retrying', {attempt = attempts, error = ARGV[5], retry_at = now + tonumber(ARGV[6])})
  return done('retrying')
end

if mode == 'throttled' then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
  redis.call('HINCRBY', KEYS[1], 'throttled', 1)
  -- the turn it was given: when it comes back it is served as the holder of that turn
  redis.call('HSET', KEYS[1], 'turn', ARGV[6])
  redis.call('ZADD', KEYS[7], tonumber(ARGV[6]), id)
  ev_status(KEYS[1], 'queued', {reason = 'throttled', until_ms = tonumber(ARGV[6])})
  return done('queued')
elseif mode == 'giveback' then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
  redis.call('HINCRBY', KEYS[1], 'given_back', 1)
  fq_push(fq_base(KEYS[6]), t[7], id, true)
  ev_status(KEYS[1], 'queued', {reason = 'given_back'})
  return done('queued')
elseif mode == 'permanent' then
  return bury(ARGV[5])
elseif mode == 'rate_limited' then
  limited = limited + 1
  redis.call('HSET', KEYS[1], 'attempts', math.max(attempts - 1, 0), 'rate_limited', limited)
  if limited >= tonumber(ARGV[8]) then
    return bury('rate limited ' .. limited .. ' times: ' .. ARGV[5])
  end
  return later()
else
  if attempts >= max then
    return bury(ARGV[5])
  end
  return later()
end
