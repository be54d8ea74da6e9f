-- Settle a reservation once the call is over: its tokens become what the upstream reported
-- (unused reserved tokens go back), a request that never reached the upstream is handed back,
-- and the concurrency lease ends.
-- KEYS: as for reserve.lua (model scope hash, its leases, [upstream scope hash, its leases]).
-- ARGV[1] the reservation's bucket second, ARGV[2] tokens reserved, ARGV[3] tokens used,
-- ARGV[4] lease id, ARGV[5] call latency ms (0: unknown), ARGV[6] 1 to hand the request back.
-- A bucket that already left the window is not touched: what it held no longer counts anyway.
-- Returns the number of scopes whose window was adjusted.
local sec = tonumber(ARGV[1])
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
local unrequest = ARGV[6] == '1'
local adjusted = 0

local function add(h, field, sum, d)
  if d == 0 then return end
  local v = redis.call('HINCRBY', h, field, d)
  if v < 0 then
    -- the bucket was reseeded under us (state lost): never count below zero
    redis.call('HSET', h, field, 0)
    d = d - v
  end
  if redis.call('HINCRBY', h, sum, d) < 0 then redis.call('HSET', h, sum, 0) end
end

for i = 0, 1 do
  local h = KEYS[1 + i * 2]
  if h then
    local head = tonumber(redis.call('HGET', h, 'head'))
    if head and sec >= head and redis.call('HEXISTS', h, 't:' .. sec) == 1 then
      add(h, 't:' .. sec, 'tsum', delta)
      if not unrequest then
        -- tokens a call really uses: parked tasks are paced by it, not by the (larger) estimate
        local used = tonumber(ARGV[3])
        local old = tonumber(redis.call('HGET', h, 'tok'))
        if old then used = math.floor(old * 0.8 + used * 0.2 + 0.5) end
        redis.call('HSET', h, 'tok', used)
      end
      if unrequest then add(h, 'r:' .. sec, 'rsum', -1) end
      adjusted = adjusted + 1
    end
    redis.call('ZREM', KEYS[2 + i * 2], ARGV[4])
  end
end
local lat = tonumber(ARGV[5])
if lat > 0 then
  -- the model's typical call time paces tasks parked on its concurrency limit
  local old = tonumber(redis.call('HGET', KEYS[1], 'lat'))
  if old then lat = math.floor(old * 0.8 + lat * 0.2) end
  redis.call('HSET', KEYS[1], 'lat', lat)
end
return adjusted
