-- Release a call's hold on its workflow's max_cost_usd and charge what the call cost. As in
-- budget_settle.lua, settling a hold that is gone (settled already, or expired) charges nothing,
-- so a resent settlement never charges twice.
-- KEYS[1] the workflow hash, KEYS[2] its holds zset
-- ARGV[1] the hold's member, ARGV[2] the call's cost in nano-dollars
-- Returns 1 when the hold was settled, 0 when it was gone.
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'max_cost') == 1 then
  redis.call('HINCRBY', KEYS[1], 'cost_spent', tonumber(ARGV[2]))
end
return 1
