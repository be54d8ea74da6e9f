-- Release a call's hold on its workflow's max_cost_usd and charge what the call cost.
-- KEYS[1] the workflow hash, KEYS[2] its holds zset
-- ARGV[1] the hold's member, ARGV[2] the call's cost in nano-dollars
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'max_cost') == 1 then
  redis.call('HINCRBY', KEYS[1], 'cost_spent', tonumber(ARGV[2]))
end
return 1
