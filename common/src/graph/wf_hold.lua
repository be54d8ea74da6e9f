-- Hold a call's worst-case cost against its workflow's max_cost_usd, atomically over every
-- node's calls in flight (the budget reservation of budget_reserve.lua, for one workflow).
-- KEYS[1] the workflow hash, KEYS[2] its holds zset (member 'lease|nanos', score = expiry ms)
-- ARGV[1] now ms, ARGV[2] member, ARGV[3] worst-case nano-dollars, ARGV[4] expiry ms
-- Returns {1, cap, spent, held} when held (or the workflow has no cap, or is gone), else
-- {0, cap, spent, held}.
local h = redis.call('HMGET', KEYS[1], 'max_cost', 'cost_spent', 'status')
local cap = tonumber(h[1])
if not cap or h[3] ~= 'running' then return {1, 0, 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[1]))
local held = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  held = held + (tonumber(string.match(m, '|(%d+)$')) or 0)
end
local spent = tonumber(h[2]) or 0
if spent + held + tonumber(ARGV[3]) > cap then return {0, cap, spent, held} end
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[2])
return {1, cap, spent, held}
