-- Reliable fetch, fair across tenants: take up to N tickets from pending, choose for each an id
-- from the tenants' lines in the ring's weighted round robin, move it into this worker's in-flight
-- list and start a run of it, minting the run's fencing token (fair.lua describes the keys).
-- KEYS[1] pending list (tickets), KEYS[2] this worker's in-flight list, KEYS[3] active zset,
-- KEYS[4] dead zset, KEYS[5] workers set, KEYS[6] this worker's heartbeat key
-- ARGV[1] task key prefix, ARGV[2] N (tickets to take from pending), ARGV[3] now ms, ARGV[4] worker
-- id, ARGV[5] what the worker's blocking wait already moved from pending into its in-flight list
-- (a ticket '~', or an id queued before tickets existed), or '', ARGV[6] result TTL seconds,
-- ARGV[7] heartbeat TTL seconds
-- Task keys are built from ARGV[1] .. id, the tenants' lines, the ring and the `turns`, `running`
-- and `tenants` hashes from KEYS[1]: they share the queue's hash tag, so they live in the same
-- cluster slot as KEYS.
-- Returns a flat array: first 1 when tickets were handed back because every tenant with work was
-- at its max_running (the worker then waits a little before asking again), else 0; then id,
-- attempts, payload, rate_limited, created_at, token, turn for every run started (turn: the time
-- the flow limiter gave the task when it parked it, 0 if it was not parked; taken off the record,
-- so it is used once).
-- Ids whose task is finished or cancelled are dropped, and so is a copy of an id another run owns
-- (status running): a task is never started while a run still holds its token. Ids with no record,
-- and tasks whose attempts were used up by lost workers, are dead-lettered.
-- The choice: the ring's head tenant takes up to its weight (`w:<tenant>` in `tenants`, 1 when
-- unset) turns in a row, counted in `turns` across calls, then goes to the ring's end; a tenant
-- whose runs in this queue are at `r:<tenant>` is passed over (rotated) without a turn; a tenant
-- whose line empties leaves the ring. With one tenant in the ring nothing rotates, and its ids are
-- taken in one RPOP. Within a tenant the order is its line's: FIFO, with give-backs and parked
-- turns at the head.
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[6])
local base = fq_base(KEYS[1])
local out = {0}
-- runs started here per tenant, added to `running` at the end (one HINCRBY per tenant)
local started = {}
-- the runs started here as `active` members (score, id, ...), added at the end in one ZADD
local act = {}

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
  local t = redis.call('HMGET', tkey, 'status', 'attempts', 'max_attempts', 'payload', 'rate_limited', 'error', 'created_at', 'turn', 'wf', 'tenant', 'ev', 'runs')
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
  -- numbers go to Redis (and into the event's JSON) as strings made once: Lua formats a number
  -- argument anew for every call that takes it; ARGV[3] is `now` as the worker wrote it
  local att = tostring(attempts)
  -- the run's fencing token: `runs` plus one, written with the rest (the script is atomic, so
  -- this is HINCRBY's count without its own command)
  local token = tostring((tonumber(t[12]) or 0) + 1)
  redis.call('HSET', tkey, 'status', 'running', 'attempts', att, 'started_at', ARGV[3],
    'worker', ARGV[4], 'token', token, 'runs', token)
  act[#act + 1] = ARGV[3]
  act[#act + 1] = id
  local tenant = t[10]
  if not tenant or tenant == '' then tenant = 'default' end
  started[tenant] = (started[tenant] or 0) + 1
  -- a client streaming the task drops any partial text of an earlier attempt on attempt_started;
  -- written only when the task's stream is on (events.lua, "Streams on demand")
  ev_started(tkey, att, token, t[9] ~= false, t[11])
  out[#out + 1] = id
  out[#out + 1] = attempts
  out[#out + 1] = t[4] or ''
  out[#out + 1] = tonumber(t[5]) or 0
  out[#out + 1] = tonumber(t[7]) or 0
  out[#out + 1] = token
  out[#out + 1] = tonumber(t[8]) or 0
  if t[8] then redis.call('HDEL', tkey, 'turn') end
end

-- Moves up to k ids from the head of a tenant's line into the in-flight list and starts them;
-- returns how many ids the line gave (fewer than k: the line is empty now).
local function take(list, k)
  if k == 1 then
    local id = redis.call('LMOVE', list, KEYS[2], 'RIGHT', 'LEFT')
    if not id then return 0 end
    start(id)
    return 1
  end
  local ids = redis.call('RPOP', list, k)
  if not ids then return 0 end
  redis.call('LPUSH', KEYS[2], unpack(ids))
  for _, id in ipairs(ids) do start(id) end
  return #ids
end

-- Spends `want` tickets on the ring's tenants. Returns the tickets not spent and whether that was
-- because every tenant with work is at its max_running.
local function choose(want)
  local ring = base .. 'ring'
  local head = redis.call('LRANGE', ring, 0, 1)
  -- tickets with no tenant line behind them cannot be spent: dropped, so pending tells the truth
  if not head[1] then return 0, false end
  local t, single = head[1], head[2] == nil
  local cfg = {}
  local ring_len = nil
  local passed = 0
  while want > 0 do
    local c = cfg[t]
    if not c then
      local a = redis.call('HMGET', base .. 'tenants', 'w:' .. t, 'r:' .. t)
      c = {w = tonumber(a[1]) or 1, cap = tonumber(a[2])}
      if c.cap then c.run = tonumber(redis.call('HGET', base .. 'running', t)) or 0 end
      cfg[t] = c
    end
    local room = want
    if c.cap then room = math.min(room, c.cap - c.run - (started[t] or 0)) end
    if room <= 0 then
      -- at its max_running: its turn passes to the next tenant, and its visit ends
      if single then return want, true end
      ring_len = ring_len or redis.call('LLEN', ring)
      passed = passed + 1
      if passed >= ring_len then return want, true end
      if c.w > 1 then redis.call('HDEL', base .. 'turns', t) end
      redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      t = redis.call('LINDEX', ring, 0)
    else
      local used = 0
      local k = room
      if not single then
        if c.w > 1 then used = tonumber(redis.call('HGET', base .. 'turns', t)) or 0 end
        k = math.min(k, math.max(c.w - used, 1))
      end
      local list = base .. 'pending:' .. t
      local got = take(list, k)
      want = want - got
      if got > 0 then passed = 0 end
      if got < k or redis.call('LLEN', list) == 0 then
        -- the line is empty: the tenant leaves the ring (it is the head)
        redis.call('LPOP', ring)
        if c.w > 1 then redis.call('HDEL', base .. 'turns', t) end
        if ring_len then ring_len = ring_len - 1 end
        head = redis.call('LRANGE', ring, 0, 1)
        if not head[1] then return want, false end
        t, single = head[1], head[2] == nil
      elseif not single then
        if used + got >= c.w then
          -- its turns are used: to the ring's end
          if c.w > 1 then redis.call('HDEL', base .. 'turns', t) end
          redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
          t = redis.call('LINDEX', ring, 0)
        else
          -- this call's tickets ran out within its turns: the next call goes on from here
          redis.call('HSET', base .. 'turns', t, used + got)
        end
      end
    end
  end
  return 0, false
end

-- Tickets in hand: the one the blocking wait moved (only if it is still in this worker's list: a
-- worker stopped past its heartbeat gets the wait's reply late, after recovery took the list) and
-- those taken now. An element that is not a ticket is an id queued before tickets existed: it is
-- started as fetch always did.
local want = 0
if ARGV[5] == '~' then
  if redis.call('LREM', KEYS[2], 1, '~') == 1 then want = 1 end
elseif ARGV[5] ~= '' and redis.call('LPOS', KEYS[2], ARGV[5]) then
  start(ARGV[5])
end
local n = tonumber(ARGV[2])
if n > 0 then
  local got = redis.call('RPOP', KEYS[1], n)
  if got then
    for _, e in ipairs(got) do
      if e == '~' then
        want = want + 1
      else
        redis.call('LPUSH', KEYS[2], e)
        start(e)
      end
    end
  end
end
if want > 0 then
  local left, capped = choose(want)
  if left > 0 and capped then
    -- every tenant with work is at its max_running: the tickets go back, and the worker waits
    local back = {}
    for i = 1, left do back[i] = '~' end
    redis.call('RPUSH', KEYS[1], unpack(back))
    out[1] = 1
  end
end
-- in slices: unpack is bounded by Lua's C stack (a fetch takes up to 1,000 ids)
for i = 1, #act, 256 do
  redis.call('ZADD', KEYS[3], unpack(act, i, math.min(i + 255, #act)))
end
for tenant, k in pairs(started) do
  redis.call('HINCRBY', base .. 'running', tenant, k)
end
return out
