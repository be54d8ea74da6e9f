-- Budget settlement: release a call's hold and charge what the call really cost. Settling a hold
-- that is gone (settled already, or expired) charges nothing, so a resent settlement never
-- charges twice.
-- KEYS[1] budget config hash, then per held scope i: KEYS[2i] spend hash, KEYS[2i+1] holds zset
-- ARGV[1] now ms, ARGV[2] hold id, ARGV[3] real cost (nano-dollars), ARGV[4..] the held scopes, in
-- KEYS order.
-- Returns the number of holds settled.
local now = tonumber(ARGV[1])
local id = ARGV[2]
local cost = tonumber(ARGV[3])
local nscopes = #ARGV - 3
local settled = 0
for i = 1, nscopes do
  local scope = ARGV[3 + i]
  local spend, holds = KEYS[2 * i], KEYS[2 * i + 1]
  local v = tonumber(redis.call('HGET', spend, 'h:' .. id))
  if v then
    redis.call('HDEL', spend, 'h:' .. id)
    redis.call('HINCRBY', spend, 'held', -v)
    redis.call('ZREM', holds, id)
    settled = settled + 1
    local conf = redis.call('HGET', KEYS[1], scope)
    local window_s, mode
    if conf then window_s, mode = string.match(conf, '^%d+|(%d+)|(%a+)$') end
    if window_s and cost > 0 then
      window_s = tonumber(window_s)
      local size = window_s
      if mode ~= 'calendar' then size = math.max(1, math.floor(window_s / 60)) end
      redis.call('HINCRBY', spend, 'b:' .. math.floor(now / 1000 / size), cost)
    end
  end
end
return settled
