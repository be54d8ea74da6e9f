-- Settle reservations once their calls are over: their tokens become what the upstream reported
-- (unused reserved tokens go back), a request that never reached the upstream is handed back,
-- and the concurrency leases end. One script call settles a batch of calls on the same route
-- (the worker coalesces the settlements that arrive together), with the same result as settling
-- them one by one. An item is one call, or a whole grant (see reserve.lua): the calls it served,
-- the requests it did not use handed back, its slots released.
-- KEYS: as for reserve.lua (model scope hash, its leases, [upstream scope hash, its leases]).
-- ARGV, eight values per item: the reservation's bucket second, tokens reserved, tokens used,
-- lease id, call latency ms (0: unknown; a grant's: the mean of its calls), requests to hand
-- back (1 for a call that never reached the upstream), calls served (a call: 1, or 0 when
-- handed back; used tokens and latency count once per call served), slots (a grant's: its
-- lease, named by the id, weighs that many slots, see reserve.lua; 0: a call's lease, if any).
-- A bucket that already left the window is not touched: what it held no longer counts anyway.
-- Returns the number of (scope, item) settlements that adjusted a window.
local n = math.floor(#ARGV / 8)
local adjusted = 0
-- a grant's calls move the averages as that many calls with its mean would; past this many the
-- old value no longer shows (0.8^30 < 0.002)
local MAX_SAMPLES = 30

-- The items, grouped by bucket second (a batch spans one or two seconds): token and request
-- deltas per second, and what the model's averages become, computed once for every scope.
local secs, dt, dr, count, leases, nleases = {}, {}, {}, {}, {}, 0
local grants, gslots = {}, {}
local used_k, used_v, used_n, nused = {}, {}, {}, 0
local lat_seq, lat_n, nlat = {}, {}, 0
local by_sec = {}
for j = 0, n - 1 do
  local b = j * 8
  local sec = tonumber(ARGV[1 + b])
  local used = tonumber(ARGV[3 + b])
  local served = tonumber(ARGV[7 + b])
  local k = by_sec[sec]
  if not k then
    k = #secs + 1
    secs[k], dt[k], dr[k], count[k], by_sec[sec] = sec, 0, 0, 0, k
  end
  count[k] = count[k] + 1
  dt[k] = dt[k] + used - tonumber(ARGV[2 + b])
  dr[k] = dr[k] - tonumber(ARGV[6 + b])
  if served > 0 then
    nused = nused + 1
    used_k[nused], used_v[nused], used_n[nused] = k, math.floor(used / served + 0.5),
      math.min(served, MAX_SAMPLES)
  end
  local lease, slots = ARGV[4 + b], tonumber(ARGV[8 + b])
  if slots > 0 then
    grants[#grants + 1], gslots[#grants + 1] = lease, slots
  elseif lease ~= '' then
    nleases = nleases + 1
    leases[nleases] = lease
  end
  local l = tonumber(ARGV[5 + b])
  if l > 0 then
    nlat = nlat + 1
    lat_seq[nlat], lat_n[nlat] = l, math.max(1, math.min(served, MAX_SAMPLES))
  end
end

for i = 0, 1 do
  local h = KEYS[1 + i * 2]
  if h then
    local st = redis.call('HMGET', h, 'head', 'tok', 'lat')
    local head = tonumber(st[1])
    -- a bucket already gone from the window (or a window reseeded under us) is left alone
    local live = {}
    for k = 1, #secs do
      live[k] = head ~= nil and secs[k] >= head and redis.call('HEXISTS', h, 't:' .. secs[k]) == 1
    end
    local function add(field, sum, d)
      if d == 0 then return end
      local v = redis.call('HINCRBY', h, field, d)
      if v < 0 then
        -- the bucket was reseeded under us (state lost): never count below zero
        redis.call('HSET', h, field, 0)
        d = d - v
      end
      if redis.call('HINCRBY', h, sum, d) < 0 then redis.call('HSET', h, sum, 0) end
    end
    for k = 1, #secs do
      if live[k] then
        add('t:' .. secs[k], 'tsum', dt[k])
        add('r:' .. secs[k], 'rsum', dr[k])
      end
    end
    -- tokens a call really uses: parked tasks are paced by it, not by the (larger) estimate
    local tok, tok_seen = tonumber(st[2]), false
    for q = 1, nused do
      if live[used_k[q]] then
        local u = used_v[q]
        for _ = 1, used_n[q] do
          if tok then tok = math.floor(tok * 0.8 + u * 0.2 + 0.5) else tok = u end
        end
        tok_seen = true
      end
    end
    for k = 1, #secs do
      if live[k] then adjusted = adjusted + count[k] end
    end
    -- the model's typical call time paces tasks parked on its concurrency limit
    local lat = tonumber(st[3])
    if i == 0 then
      for q = 1, nlat do
        for _ = 1, lat_n[q] do
          if lat then lat = math.floor(lat * 0.8 + lat_seq[q] * 0.2) else lat = lat_seq[q] end
        end
      end
    end
    if tok_seen and i == 0 and nlat > 0 then
      redis.call('HSET', h, 'tok', tok, 'lat', lat)
    elseif tok_seen then
      redis.call('HSET', h, 'tok', tok)
    elseif i == 0 and nlat > 0 then
      redis.call('HSET', h, 'lat', lat)
    end
    if nleases > 0 then redis.call('ZREM', KEYS[2 + i * 2], unpack(leases)) end
    for q = 1, #grants do
      -- a lease already pruned (expired) had its weight taken off then
      if redis.call('ZREM', KEYS[2 + i * 2], grants[q]) == 1 then
        redis.call('HDEL', h, 'gw:' .. grants[q])
        redis.call('HINCRBY', h, 'gextra', 1 - gslots[q])
      end
    end
  end
end
return adjusted
