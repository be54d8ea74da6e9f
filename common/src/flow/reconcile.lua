-- Settle reservations once their calls are over: their tokens become what the upstream reported
-- (unused reserved tokens go back), a request that never reached the upstream is handed back,
-- and the concurrency leases end. One script call settles a batch of calls on the same route
-- (the worker coalesces the settlements that arrive together), with the same result as settling
-- them one by one.
-- KEYS: as for reserve.lua (model scope hash, its leases, [upstream scope hash, its leases]).
-- ARGV, six values per call: the reservation's bucket second, tokens reserved, tokens used,
-- lease id, call latency ms (0: unknown), 1 to hand the request back.
-- A bucket that already left the window is not touched: what it held no longer counts anyway.
-- Returns the number of (scope, call) settlements that adjusted a window.
local n = math.floor(#ARGV / 6)
local adjusted = 0

-- The calls, grouped by bucket second (a batch spans one or two seconds): token and request
-- deltas per second, and what the model's averages become, computed once for every scope.
local secs, dt, dr, count, leases = {}, {}, {}, {}, {}
local used_k, used_v, nused = {}, {}, 0
local lat_seq, nlat = {}, 0
local by_sec = {}
for j = 0, n - 1 do
  local b = j * 6
  local sec = tonumber(ARGV[1 + b])
  local used = tonumber(ARGV[3 + b])
  local k = by_sec[sec]
  if not k then
    k = #secs + 1
    secs[k], dt[k], dr[k], count[k], by_sec[sec] = sec, 0, 0, 0, k
  end
  count[k] = count[k] + 1
  dt[k] = dt[k] + used - tonumber(ARGV[2 + b])
  if ARGV[6 + b] == '1' then
    dr[k] = dr[k] - 1
  else
    nused = nused + 1
    used_k[nused], used_v[nused] = k, used
  end
  leases[j + 1] = ARGV[4 + b]
  local l = tonumber(ARGV[5 + b])
  if l > 0 then
    nlat = nlat + 1
    lat_seq[nlat] = l
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
        if tok then tok = math.floor(tok * 0.8 + u * 0.2 + 0.5) else tok = u end
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
        if lat then lat = math.floor(lat * 0.8 + lat_seq[q] * 0.2) else lat = lat_seq[q] end
      end
    end
    if tok_seen and i == 0 and nlat > 0 then
      redis.call('HSET', h, 'tok', tok, 'lat', lat)
    elseif tok_seen then
      redis.call('HSET', h, 'tok', tok)
    elseif i == 0 and nlat > 0 then
      redis.call('HSET', h, 'lat', lat)
    end
    redis.call('ZREM', KEYS[2 + i * 2], unpack(leases))
  end
end
return adjusted
