-- Reserve LLM calls against every scope that applies to them, or say when to come back. One
-- script call serves a batch of calls on the same route (the worker coalesces the reservations
-- its runs ask for at the same moment), decided in order exactly as if each were its own call:
-- the fixed cost of a script (reading the scopes' state, pruning leases, writing the window back)
-- is paid once per batch instead of once per call.
-- KEYS[1] model scope hash, KEYS[2] its leases zset, [KEYS[3] upstream scope hash, KEYS[4] its
-- leases zset] (the upstream scope only when the upstream has limits of its own).
-- ARGV[1] state TTL ms (0: none), ARGV[2..4] model scope rpm, tpm, concurrency, ARGV[5..7]
-- upstream scope's (0 = no limit), ARGV[8..13] a grant request (see below; ARGV[8] = 0: none),
-- then per call four values from ARGV[14]: tokens to reserve
-- (estimated prompt + max_tokens), lease id, lease length ms (a crashed worker's lease ends by
-- itself), and the call's place in the line of parked tasks: 0 probe (a model
-- with fallbacks after it: a line counts as a refusal, no turn is taken), 1 join (a new arrival
-- that parks if refused: behind a line it takes the next turn even when there is room, so
-- parked tasks are never overtaken), 2 turn (a parked task back at its turn: served ahead of
-- the line; refused, it lines up again).
-- Returns four values per call: {1, sec, held, 0} admitted (tokens counted in bucket `sec`;
-- held 0 when no scope counted anything or took a lease, so there is nothing to settle),
-- {0, eligible_ms, reason, limit} not now, or {2, limit, 0, 0} when the call alone needs more
-- tokens than a minute allows.
--
-- Grants. A worker whose route is hot (many calls a moment) also asks for a grant: ARGV[8]
-- requests, ARGV[9] tokens, ARGV[10] concurrency slots, ARGV[11] the grant's id, ARGV[12] its
-- slots' lease length ms, ARGV[13] the longest the grant may last ms. A grant's slots are one
-- lease named by its id, weighing `gw:<id>` slots (field of the scope hash); `gextra` sums what
-- the grants' leases weigh beyond one each, so leases held = ZCARD + gextra. Granted, they are
-- counted now, in this second's bucket, exactly as that many calls
-- reserved at once would be; the worker admits its calls from the grant with no script until it
-- is spent or over, then settles it in one `reconcile.lua` item (what its calls used, the
-- requests they did not make handed back, the slots released). A grant is given only far from
-- every limit (at most a quarter of what is left of each, so workers cannot hoard a minute and
-- near a limit every call is decided here one by one), never to a scope that is blocked or has a
-- line of parked tasks or refused a call of this batch, and it lasts at most until this second
-- ends: every call it admits falls in the bucket it was counted in, and a block or a learned
-- limit reaches a grant holder when its grant ends. Six values follow the calls' replies:
-- {requests, tokens, slots, valid_ms, sec, counted}, requests 0 when no grant.
--
-- Window: a sliding minute of 1 s buckets (`r:<sec>` requests, `t:<sec>` tokens, running sums
-- `rsum`/`tsum`, oldest live bucket `head`). A bucket counts until 61 s after it opened, so every
-- 60 s span the provider may look at is covered (conservative by at most 1 s). Time is Redis's
-- own clock, one clock for the whole fleet.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = math.floor(now / 1000)
local ttl = tonumber(ARGV[1])
local LEARNED_FOR = 3600000
local rkey, tkey = 'r:' .. sec, 't:' .. sec

local scopes = {}
for i = 0, 1 do
  local h = KEYS[1 + i * 2]
  if h then
    local base = 2 + i * 3
    scopes[#scopes + 1] = {h = h, leases = KEYS[2 + i * 2], rpm = tonumber(ARGV[base]),
      tpm = tonumber(ARGV[base + 1]), conc = tonumber(ARGV[base + 2]), r = 0, tk = 0,
      nr = 0, nt = 0, buckets = {}}
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
    'learned_tpm', 'learned_at', 'cursor', 'lat', 'tok', 'line', rkey, tkey, 'gextra')
  local learned_at = tonumber(st[7]) or 0
  if now - learned_at < LEARNED_FOR then
    s.rpm = lower(s.rpm, tonumber(st[5]))
    s.tpm = lower(s.tpm, tonumber(st[6]))
  end
  s.blocked = tonumber(st[4]) or 0
  s.cursor = tonumber(st[8]) or 0
  s.cursor0 = s.cursor
  s.lat = tonumber(st[9]) or 1000
  s.tok = tonumber(st[10])
  s.line = st[11]
  s.r, s.tk = tonumber(st[12]) or 0, tonumber(st[13]) or 0
  s.gextra = tonumber(st[14]) or 0
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

-- A bucket's value as this batch has left it (read once per batch).
local function bucket(s, field, b)
  local k = field .. b
  local v = s.buckets[k]
  if v == nil then
    v = tonumber(redis.call('HGET', s.h, k)) or 0
    s.buckets[k] = v
  end
  if b == sec then
    if field == 'r:' then return v + s.nr end
    return v + s.nt
  end
  return v
end

-- When `need` more of `field` fits under `limit`: the end of the bucket whose expiry frees it.
local function freed_at(s, field, sum, need, limit)
  local free = 0
  for b = s.head, sec do
    free = free + bucket(s, field, b)
    if sum - free + need <= limit then return (b + 61) * 1000 end
  end
  return (sec + 61) * 1000
end

-- The time one call takes under the scope's limits. 61 s, not 60: a bucket counts for 61 s, so
-- the window lets through 60/61 of a limit when saturated; turns paced at the full limit would
-- outrun it, and every second a few turn holders would find no room and pile up at the next
-- second's edge.
local function spacing(s, tokens)
  local gap = 10
  if s.rpm > 0 then gap = math.max(gap, 61000 / s.rpm) end
  -- a turn's share of the tokens: what calls here really use (settled), not the reservation,
  -- which counts the whole output cap and would pace parked tasks far below the limit
  if s.tpm > 0 then gap = math.max(gap, math.min(tokens, s.tok or tokens) * 61000 / s.tpm) end
  if s.conc > 0 then gap = math.max(gap, s.lat / s.conc) end
  return math.floor(gap)
end

for _, s in ipairs(scopes) do
  window(s)
  if s.conc > 0 then
    local gone = redis.call('ZRANGEBYSCORE', s.leases, '-inf', now)
    if #gone > 0 then
      redis.call('ZREMRANGEBYSCORE', s.leases, '-inf', now)
      -- a crashed worker's grant: its lease ends with all its slots
      for _, m in ipairs(gone) do
        if string.sub(m, 1, 2) == 'g:' then
          local w = tonumber(redis.call('HGET', s.h, 'gw:' .. m))
          if w then
            redis.call('HDEL', s.h, 'gw:' .. m)
            s.gextra = redis.call('HINCRBY', s.h, 'gextra', 1 - w)
          end
        end
      end
    end
    s.held = redis.call('ZCARD', s.leases)
    if s.held == 0 and s.gextra ~= 0 then
      -- the leases expired as a whole (an idle route after a crash): their weights go too
      local cur = '0'
      repeat
        local r = redis.call('HSCAN', s.h, cur, 'MATCH', 'gw:*', 'COUNT', 100)
        cur = r[1]
        for q = 1, #r[2], 2 do redis.call('HDEL', s.h, r[2][q]) end
      until cur == '0'
      redis.call('HSET', s.h, 'gextra', 0)
      s.gextra = 0
    end
    s.held = s.held + s.gextra
    s.new_leases = {}
    s.lease_ms = 0
  end
end

local out = {}
local o = 0
local n = math.floor((#ARGV - 13) / 4)
local any_refused = false
local nscopes = #scopes
-- Per call state of the decision, reset for each call (no closure or table per call: the loop
-- below is the per-call cost of a batch, kept to plain arithmetic).
-- A call that lines up when refused waits for the scope's line too, so the scope where it would
-- wait longest binds: its line is the one to join. (Two scopes can refuse at the same instant,
-- e.g. an upstream limit and the same limit learned for its only model, whose windows hold the
-- same calls once the upstream's seeded minute has aged out; binding the first one, with no line
-- of its own, put the refused at its next second's edge ahead of the upstream's whole line.)
local wait_until, reason, limit, binding, bound_at, joining
local function refuse(s, at, why, lim)
  local key = at
  if joining then key = math.max(at, s.cursor) end
  if key > bound_at then
    wait_until, reason, limit, binding, bound_at = at, why, lim, s, key
  end
end
for i = 0, n - 1 do
  local tokens = tonumber(ARGV[14 + i * 4])
  local mode = ARGV[17 + i * 4]
  joining = mode == '1' or mode == '2'
  wait_until, reason, limit, binding, bound_at = 0, nil, 0, nil, 0
  local too_large = nil
  for j = 1, nscopes do
    local s = scopes[j]
    if s.tpm > 0 and tokens > s.tpm then too_large = s.tpm break end
    if s.blocked > now then refuse(s, s.blocked, 'blocked', 0) end
    if s.counted then
      if s.rpm > 0 and s.rsum + 1 > s.rpm then
        refuse(s, freed_at(s, 'r:', s.rsum, 1, s.rpm), 'rpm', s.rpm)
      end
      if s.tpm > 0 and s.tsum + tokens > s.tpm then
        refuse(s, freed_at(s, 't:', s.tsum, tokens, s.tpm), 'tpm', s.tpm)
      end
    end
    if s.conc > 0 and s.held >= s.conc then
      refuse(s, now + math.max(50, math.floor(s.lat / s.conc)), 'concurrency', s.conc)
    end
  end
  -- Tasks are parked on a scope: a newcomer waits behind them even if there is room this instant,
  -- so admissions follow the line at the limit's pace instead of each second's allowance going
  -- out in one burst to whoever asks first (a burst the autoscaler would read as a busy fleet).
  -- A newcomer checks the lines even when already refused, so it joins the longest.
  if not too_large and (mode == '1' or (not reason and mode == '0')) then
    for j = 1, nscopes do
      local s = scopes[j]
      if s.line and s.cursor > now then refuse(s, s.cursor, s.line, 0) end
    end
  end
  if too_large or reason then any_refused = true end
  if too_large then
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 2, too_large, 0, 0
  elseif reason then
    -- A token limit paces its line by what calls settle to; before the first call on the scope
    -- has settled there is nothing to pace by, so the task just comes back when room next frees
    -- (one extra park at a cold start) instead of taking a turn sized by the whole estimate.
    -- A turn holder refused (the line ran ahead of the room, or a block caught it) lines up
    -- again too: coming back when room frees, keeping its place, those refused together would
    -- meet the next turns there and be refused again, in a loop that grows.
    if joining and not (reason == 'tpm' and not binding.tok) then
      -- Tasks parked on one scope take turns: each gets the next slot the limit allows, so they
      -- come back one by one at the scope's pace instead of all at once to be parked again.
      local at = math.max(wait_until, binding.cursor)
      binding.cursor = at + spacing(binding, tokens)
      binding.line = reason
      binding.moved = true
      wait_until = at
    end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 0, wait_until, reason, limit
  else
    local held = 0
    for j = 1, nscopes do
      local s = scopes[j]
      if s.counted then
        held = 1
        s.nr = s.nr + 1
        s.nt = s.nt + tokens
        s.rsum = s.rsum + 1
        s.tsum = s.tsum + tokens
      end
      if s.conc > 0 then
        held = 1
        s.held = s.held + 1
        local lease_ms = tonumber(ARGV[16 + i * 4])
        local nl = s.new_leases
        nl[#nl + 1] = now + lease_ms
        nl[#nl + 1] = ARGV[15 + i * 4]
        if lease_ms > s.lease_ms then s.lease_ms = lease_ms end
      end
    end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 1, sec, held, 0
  end
  o = o + 4
end

-- The grant, decided after the batch's own calls (they asked first).
local gn, gt, gc = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local valid = math.min(tonumber(ARGV[13]), (sec + 1) * 1000 - now)
local counted, leased = false, false
if gn > 0 and not any_refused and valid >= 5 then
  for j = 1, nscopes do
    local s = scopes[j]
    if s.blocked > now or (s.line and s.cursor > now) then gn = 0 end
    if s.counted then
      counted = true
      if s.rpm > 0 then gn = math.min(gn, math.floor((s.rpm - s.rsum) / 4)) end
      if s.tpm > 0 then gt = math.min(gt, math.floor((s.tpm - s.tsum) / 4)) end
    end
    if s.conc > 0 then
      leased = true
      gc = math.min(gc, math.floor((s.conc - s.held) / 4))
    end
  end
  if not leased then gc = 0 end
  if gn < 4 or gt < 1 or (leased and gc < 1) then gn = 0 end
else
  gn = 0
end
if gn > 0 then
  local lease_until = now + valid + tonumber(ARGV[12])
  for j = 1, nscopes do
    local s = scopes[j]
    if s.counted then
      s.nr = s.nr + gn
      s.nt = s.nt + gt
      s.rsum = s.rsum + gn
      s.tsum = s.tsum + gt
    end
    if s.conc > 0 then
      local nl = s.new_leases
      nl[#nl + 1] = lease_until
      nl[#nl + 1] = ARGV[11]
      redis.call('HSET', s.h, 'gw:' .. ARGV[11], gc)
      redis.call('HINCRBY', s.h, 'gextra', gc - 1)
      if valid + tonumber(ARGV[12]) > s.lease_ms then s.lease_ms = valid + tonumber(ARGV[12]) end
    end
  end
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = gn, gt, gc, valid, sec
  out[o + 6] = (counted or leased) and 1 or 0
else
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] = 0, 0, 0, 0, sec, 0
end

-- Write back what the batch changed, once per scope.
for _, s in ipairs(scopes) do
  local touched = false
  if s.nr > 0 then
    redis.call('HSET', s.h, rkey, s.r + s.nr, tkey, s.tk + s.nt, 'rsum', s.rsum, 'tsum', s.tsum)
    touched = true
  end
  if s.moved then
    redis.call('HSET', s.h, 'cursor', s.cursor, 'line', s.line)
    touched = true
  end
  if touched and ttl > 0 then redis.call('PEXPIRE', s.h, ttl) end
  if s.conc > 0 and #s.new_leases > 0 then
    redis.call('ZADD', s.leases, unpack(s.new_leases))
    -- only ever lengthened: a shorter lease (another worker's LLM timeout) must not cut a longer
    -- one's life short
    if redis.call('PTTL', s.leases) < s.lease_ms then redis.call('PEXPIRE', s.leases, s.lease_ms) end
  end
end
return out
