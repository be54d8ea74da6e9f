-- Budget settlement: release a call's hold and charge what the call really cost; and add the
-- call to the usage report. Settling a hold that is gone (settled already, or expired) charges
-- nothing, so a resent settlement never charges twice.
-- KEYS[1] budget config hash, then per held scope i: KEYS[2i] spend hash, KEYS[2i+1] holds zset;
-- then KEYS[n-1] this minute's usage hash, KEYS[n] this hour's usage hash
-- ARGV[1] now ms, ARGV[2] hold id, ARGV[3] real cost (nano-dollars), ARGV[4] prompt tokens,
-- ARGV[5] completion tokens, ARGV[6] 1 to count the call in the usage report, ARGV[7] agent
-- ('' none), ARGV[8] queue, ARGV[9] model, ARGV[10..] the held scopes, in KEYS order.
-- Returns the number of holds settled.
local now = tonumber(ARGV[1])
local id = ARGV[2]
local cost = tonumber(ARGV[3])
local nscopes = #ARGV - 9
local settled = 0
for i = 1, nscopes do
  local scope = ARGV[9 + i]
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
if ARGV[6] == '1' then
  local n = #KEYS
  local fields = {}
  if ARGV[7] ~= '' then fields[#fields + 1] = 'agent|' .. ARGV[7] end
  fields[#fields + 1] = 'queue|' .. ARGV[8]
  fields[#fields + 1] = 'model|' .. ARGV[9]
  for k = n - 1, n do
    for _, f in ipairs(fields) do
      redis.call('HINCRBY', KEYS[k], f .. '|c', cost)
      redis.call('HINCRBY', KEYS[k], f .. '|p', tonumber(ARGV[4]))
      redis.call('HINCRBY', KEYS[k], f .. '|o', tonumber(ARGV[5]))
      redis.call('HINCRBY', KEYS[k], f .. '|n', 1)
    end
  end
  -- minutes are read for windows up to a day, hours up to 30 days
  redis.call('EXPIRE', KEYS[n - 1], 86400 + 120)
  redis.call('EXPIRE', KEYS[n], 31 * 86400 + 7200)
end
return settled
