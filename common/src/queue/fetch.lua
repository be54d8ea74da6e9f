-- Reliable fetch: move up to N ids from pending into this worker's in-flight list and start a run
-- of each, minting the run's fencing token.
-- KEYS[1] pending list, KEYS[2] this worker's in-flight list, KEYS[3] active zset, KEYS[4] dead zset,
-- KEYS[5] workers set, KEYS[6] this worker's heartbeat key
-- ARGV[1] task key prefix, ARGV[2] N (ids to take from pending), ARGV[3] now ms, ARGV[4] worker id,
-- ARGV[5] an id the worker already moved with BLMOVE, or '', ARGV[6] result TTL seconds,
-- ARGV[7] heartbeat TTL seconds
-- Task keys are built from ARGV[1] .. id: they share the queue's hash tag, so they live in the
-- same cluster slot as KEYS.
-- Returns a flat array: id, attempts, payload, rate_limited, created_at, token, turn for every run
-- started (turn: the time the flow limiter gave the task when it parked it, 0 if it was not parked;
-- taken off the record, so it is used once).
-- Ids whose task is finished or cancelled are dropped, and so is a copy of an id another run owns
-- (status running): a task is never started while a run still holds its token. Ids with no record,
-- and tasks whose attempts were used up by lost workers, are dead-lettered.
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[6])
local out = {}

-- A worker that takes work is alive and registered, in the same step: a worker killed right after
-- its first fetch (before any heartbeat), or recovered while stalled, is still found and recovered
-- by the others. While its heartbeat key exists it is registered already (the heartbeat writes
-- both, and recovery needs the key gone), so the common case costs one EXISTS.
if redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('SADD', KEYS[5], ARGV[4])
  redis.call('SET', KEYS[6], now, 'EX', tonumber(ARGV[7]))
end

local function bury(tkey, id, reason)
  redis.call('HSET', tkey, 'status', 'failed', 'error', reason, 'finished_at', now)
  redis.call('HDEL', tkey, 'token')
  redis.call('EXPIRE', tkey, ttl)
  redis.call('ZADD', KEYS[4], now, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl * 1000)
  ev_final(tkey, 'failed', ttl, reason)
  wf().final(tkey, 'failed', nil, reason, now)
end

local function start(id)
  local tkey = ARGV[1] .. id
  local t = redis.call('HMGET', tkey, 'status', 'attempts', 'max_attempts', 'payload', 'rate_limited', 'error', 'created_at', 'turn', 'wf')
  local status = t[1]
  if not status then
    redis.call('LREM', KEYS[2], 1, id)
    bury(tkey, id, 'poison: task record missing')
    return
  end
  if status ~= 'queued' and status ~= 'retrying' then
    -- finished or cancelled: never run again; running: another run owns it, and this copy is a
    -- duplicate (its owner's own copy stays in the owner's in-flight list)
    redis.call('LREM', KEYS[2], 1, id)
    return
  end
  local attempts = tonumber(t[2]) or 0
  local max = tonumber(t[3]) or 1
  if attempts >= max then
    -- only reachable for a task recovered from a lost worker: that run counted as an attempt
    redis.call('LREM', KEYS[2], 1, id)
    local last = t[6]
    if not last or last == '' then last = 'worker lost while running the task' end
    bury(tkey, id, 'attempts exhausted (' .. attempts .. ' of ' .. max .. '): ' .. last)
    return
  end
  attempts = attempts + 1
  local token = redis.call('HINCRBY', tkey, 'runs', 1)
  redis.call('HSET', tkey, 'status', 'running', 'attempts', attempts, 'started_at', now,
    'worker', ARGV[4], 'token', token)
  redis.call('ZADD', KEYS[3], now, id)
  -- a client streaming the task drops any partial text of an earlier attempt on attempt_started
  ev_started(tkey, attempts, token, t[9] ~= false)
  out[#out + 1] = id
  out[#out + 1] = attempts
  out[#out + 1] = t[4] or ''
  out[#out + 1] = tonumber(t[5]) or 0
  out[#out + 1] = tonumber(t[7]) or 0
  out[#out + 1] = tostring(token)
  out[#out + 1] = tonumber(t[8]) or 0
  if t[8] then redis.call('HDEL', tkey, 'turn') end
end

-- The id a blocking wait moved: only if it is still in this worker's list. A worker that was
-- stopped past its heartbeat gets the wait's reply late, after recovery took the id away.
if ARGV[5] ~= '' and redis.call('LPOS', KEYS[2], ARGV[5]) then
  start(ARGV[5])
end
local n = tonumber(ARGV[2])
for _ = 1, n do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not id then break end
  start(id)
end
return out
