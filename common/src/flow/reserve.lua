-- Reserve one LLM call against every scope that applies to it, or say when to come back.
-- KEYS[1] model scope hash, KEYS[2] its leases zset, [KEYS[3] upstream scope hash, KEYS[4] its
-- leases zset] (the upstream scope only when the upstream has limits of its own).
-- ARGV[1] tokens to reserve (estimated prompt + max_tokens), ARGV[2] lease id, ARGV[3] lease
-- length ms (a crashed worker's lease ends by itself), ARGV[4] the call's place in the line of
-- parked tasks: 0 probe (a model with fallbacks after it: a line counts as a refusal, no turn is
-- taken), 1 join (a new arrival that parks if refused: behind a line it takes the next turn even
-- when there is room, so parked tasks are never overtaken), 2 turn (a parked task back at its
-- turn: served ahead of the line; refused, it lines up again),
-- ARGV[5] state TTL ms (0: none),
-- ARGV[6..8] model scope rpm, tpm, concurrency, ARGV[9..11] upstream scope's (0 = no limit).
-- Returns {1, sec, held} admitted (tokens counted in bucket `sec`; held 0 when no scope counted
-- anything or took a lease, so there is nothing to settle), {0, eligible_ms, reason, limit}
-- not now, or {2, limit} when the call alone needs more tokens than a minute allows.
--
-- Window: a sliding minute of 1 s buckets (`r:<sec>` requests, `t:<sec>` tokens, running sums
-- `rsum`/`tsum`, oldest live bucket `head`). A bucket counts until 61 s after it opened, so every
-- 60 s span the provider may look at is covered (conservative by at most 1 s). Time is Redis's
-- own clock, one clock for the whole fleet.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = math.floor(now / 1000)
local tokens = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[3])
local mode = ARGV[4]
local ttl = tonumber(ARGV[5])
local LEARNED_FOR = 3600000

local scopes = {}
for i = 0, 1 do
  local h = KEYS[1 + i * 2]
  if h then
    local base = 6 + i * 3
    scopes[#scopes + 1] = {h = h, leases = KEYS[2 + i * 2], rpm = tonumber(ARGV[base]),
      tpm = tonumber(ARGV[base + 1]), conc = tonumber(ARGV[base + 2])}
  end
end

local function lower(conf, learned)
  if learned and learned > 0 and (conf == 0 or learned < conf) then return learned end
  return conf
end

-- Drop buckets that left the window; seed a scope that has no state as if its last minute was
-- used up evenly (first start, or state lost with Redis: the provider may still be counting).
local function window(s)
  local st = redis.call('HMGET', s.h, 'head', 'rsum', 'tsum', 'blocked_until', 'learned_rpm',
    'learned_tpm', 'learned_at', 'cursor', 'lat', 'tok', 'line')
  local learned_at = tonumber(st[7]) or 0
  if now - learned_at < LEARNED_FOR then
    s.rpm = lower(s.rpm, tonumber(st[5]))
    s.tpm = lower(s.tpm, tonumber(st[6]))
  end
  s.blocked = tonumber(st[4]) or 0
  s.cursor = tonumber(st[8]) or 0
  s.lat = tonumber(st[9]) or 1000
  s.tok = tonumber(st[10])
  s.line = st[11]
  s.counted = s.rpm > 0 or s.tpm > 0
  if not s.counted then return end
  local head = tonumber(st[1])
  if not head then
    head = sec - 60
    local rs, ts = 0, 0
    for i = 0, 59 do
      -- bucket i of 60 gets its even share of the limit (the shares add up to the limit)
      local b = head + i
      local r = math.floor((i + 1) * s.rpm / 60) - math.floor(i * s.rpm / 60)
      local k = math.floor((i + 1) * s.tpm / 60) - math.floor(i * s.tpm / 60)
      if r > 0 then redis.call('HSET', s.h, 'r:' .. b, r) end
      if k > 0 then redis.call('HSET', s.h, 't:' .. b, k) end
      rs, ts = rs + r, ts + k
    end
    redis.call('HSET', s.h, 'head', head, 'rsum', rs, 'tsum', ts)
    s.rsum, s.tsum, s.head = rs, ts, head
    return
  end
  local rsum, tsum = tonumber(st[2]) or 0, tonumber(st[3]) or 0
  local last = math.min(sec - 61, head + 61)
  for b = head, last do
    local v = redis.call('HMGET', s.h, 'r:' .. b, 't:' .. b)
    if v[1] or v[2] then
      rsum = rsum - (tonumber(v[1]) or 0)
      tsum = tsum - (tonumber(v[2]) or 0)
      redis.call('HDEL', s.h, 'r:' .. b, 't:' .. b)
    end
  end
  if last >= head then
    if sec - 61 > last then rsum, tsum = 0, 0 end
    if rsum < 0 then rsum = 0 end
    if tsum < 0 then tsum = 0 end
    head = sec - 60
    redis.call('HSET', s.h, 'head', head, 'rsum', rsum, 'tsum', tsum)
  end
  s.rsum, s.tsum, s.head = rsum, tsum, head
end

-- When `need` more of `field` fits under `limit`: the end of the bucket whose expiry frees it.
local function freed_at(s, field, sum, need, limit)
  local free = 0
  for b = s.head, sec do
    free = free + (tonumber(redis.call('HGET', s.h, field .. b)) or 0)
    if sum - free + need <= limit then return (b + 61) * 1000 end
  end
  return (sec + 61) * 1000
end

-- The time one call takes under the scope's limits. 61 s, not 60: a bucket counts for 61 s, so
-- the window lets through 60/61 of a limit when saturated; turns paced at the full limit would
-- outrun it, and every second a few turn holders would find no room and pile up at the next
-- second's edge.
local function spacing(s)
  local gap = 10
  if s.rpm > 0 then gap = math.max(gap, 61000 / s.rpm) end
  -- a turn's share of the tokens: what calls here really use (settled), not the reservation,
  -- which counts the whole output cap and would pace parked tasks far below the limit
  if s.tpm > 0 then gap = math.max(gap, math.min(tokens, s.tok or tokens) * 61000 / s.tpm) end
  if s.conc > 0 then gap = math.max(gap, s.lat / s.conc) end
  return math.floor(gap)
end

local wait_until, reason, limit, binding = 0, nil, 0, nil
local function refuse(s, at, why, lim)
  if at > wait_until then wait_until, reason, limit, binding = at, why, lim, s end
end

for _, s in ipairs(scopes) do
  window(s)
  if s.tpm > 0 and tokens > s.tpm then return {2, s.tpm} end
  if s.blocked > now then refuse(s, s.blocked, 'blocked', 0) end
  if s.counted then
    if s.rpm > 0 and s.rsum + 1 > s.rpm then
      refuse(s, freed_at(s, 'r:', s.rsum, 1, s.rpm), 'rpm', s.rpm)
    end
    if s.tpm > 0 and s.tsum + tokens > s.tpm then
      refuse(s, freed_at(s, 't:', s.tsum, tokens, s.tpm), 'tpm', s.tpm)
    end
  end
  if s.conc > 0 then
    redis.call('ZREMRANGEBYSCORE', s.leases, '-inf', now)
    if redis.call('ZCARD', s.leases) >= s.conc then
      refuse(s, now + math.max(50, math.floor(s.lat / s.conc)), 'concurrency', s.conc)
    end
  end
end

-- Tasks are parked on a scope: a newcomer waits behind them even if there is room this instant,
-- so admissions follow the line at the limit's pace instead of each second's allowance going out
-- in one burst to whoever asks first (a burst the autoscaler would read as a busy fleet).
if not reason and mode ~= '2' then
  for _, s in ipairs(scopes) do
    if s.line and s.cursor > now then refuse(s, s.cursor, s.line, 0) end
  end
end

if reason then
  -- A token limit paces its line by what calls settle to; before the first call on the scope has
  -- settled there is nothing to pace by, so the task just comes back when room next frees
  -- (one extra park at a cold start) instead of taking a turn sized by the whole estimate. A
  -- turn holder refused keeps its place the same way.
  -- A turn holder refused (the line ran ahead of the room, or a block caught it) lines up again
  -- too: coming back when room frees, keeping its place, those refused together would meet the
  -- next turns there and be refused again, in a loop that grows.
  local joins = mode == '1' or mode == '2'
  if joins and not (reason == 'tpm' and not binding.tok) then
    -- Tasks parked on one scope take turns: each gets the next slot the limit allows, so they
    -- come back one by one at the scope's pace instead of all at once to be parked again.
    local at = math.max(wait_until, binding.cursor)
    redis.call('HSET', binding.h, 'cursor', at + spacing(binding), 'line', reason)
    if ttl > 0 then redis.call('PEXPIRE', binding.h, ttl) end
    wait_until = at
  end
  return {0, wait_until, reason, limit}
end

local held = 0
for _, s in ipairs(scopes) do
  if s.counted or s.conc > 0 then held = 1 end
  if s.counted then
    redis.call('HINCRBY', s.h, 'r:' .. sec, 1)
    redis.call('HINCRBY', s.h, 't:' .. sec, tokens)
    redis.call('HINCRBY', s.h, 'rsum', 1)
    redis.call('HINCRBY', s.h, 'tsum', tokens)
    if ttl > 0 then redis.call('PEXPIRE', s.h, ttl) end
  end
  if s.conc > 0 then
    redis.call('ZADD', s.leases, now + lease_ms, ARGV[2])
    redis.call('PEXPIRE', s.leases, lease_ms)
  end
end
return {1, sec, held}
