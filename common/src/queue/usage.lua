-- Adds one LLM call's usage to its task's record, whichever run made it (a fenced-out run's call
-- was paid for too), unless the record is gone.
-- KEYS[1] task hash
-- ARGV[1] prompt tokens, ARGV[2] completion tokens, ARGV[3] cached tokens, ARGV[4] cost (nano-dollars)
-- Returns the task's totals after the call: {prompt + completion tokens, cost}, or {} when gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local p = redis.call('HINCRBY', KEYS[1], 'u_prompt', ARGV[1])
local c = redis.call('HINCRBY', KEYS[1], 'u_completion', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'u_cached', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'u_calls', 1)
local n = redis.call('HINCRBY', KEYS[1], 'cost_n', ARGV[4])
return {p + c, n}
