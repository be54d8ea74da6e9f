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

for i = 0, 1 do
  local h = KEYS[1 + i * 2]
  if h then
    local st = redis.call('HMGET', h, 'head', 'tok', 'lat')
    local head = tonumber(st[1])
    local tok = tonumber(st[2])
    local lat = tonumber(st[3])
    -- per bucket second: token and request deltas, and whether the bucket is still there
    local dt, dr, live, order = {}, {}, {}, {}
    local leases = {}
    local tok_seen, lat_seen = false, false
    for j = 0, n - 1 do
      local sec = tonumber(ARGV[1 + j * 6])
      local reserved, used = tonumber(ARGV[2 + j * 6]), tonumber(ARGV[3 + j * 6])
      local unrequest = ARGV[6 + j * 6] == '1'
      if head and sec >= head then
        if live[sec] == nil then
          live[sec] = redis.call('HEXISTS', h, 't:' .. sec) == 1
          dt[sec], dr[sec] = 0, 0
          order[#order + 1] = sec
        end
        if live[sec] then
          dt[sec] = dt[sec] + used - reserved
          if unrequest then
            dr[sec] = dr[sec] - 1
          else
            -- tokens a call really uses: parked tasks are paced by it, not by the (larger)
            -- estimate
            if tok then tok = math.floor(tok * 0.8 + used * 0.2 + 0.5) else tok = used end
            tok_seen = true
          end
          adjusted = adjusted + 1
        end
      end
      leases[#leases + 1] = ARGV[4 + j * 6]
      if i == 0 then
        local l = tonumber(ARGV[5 + j * 6])
        if l > 0 then
          -- the model's typical call time paces tasks parked on its concurrency limit
          if lat then lat = math.floor(lat * 0.8 + l * 0.2) else lat = l end
          lat_seen = true
        end
      end
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
    for _, sec in ipairs(order) do
      if live[sec] then
        add('t:' .. sec, 'tsum', dt[sec])
        add('r:' .. sec, 'rsum', dr[sec])
      end
    end
    if tok_seen and lat_seen then
      redis.call('HSET', h, 'tok', tok, 'lat', lat)
    elseif tok_seen then
      redis.call('HSET', h, 'tok', tok)
    elseif lat_seen then
      redis.call('HSET', h, 'lat', lat)
    end
    redis.call('ZREM', KEYS[2 + i * 2], unpack(leases))
  end
end
return adjusted
