-- Adds one LLM call's usage to its task's record, whichever run made it (a fenced-out run's call
-- was paid for too), unless the record is gone.
-- KEYS[1] task hash
-- ARGV[1] prompt tokens, ARGV[2] completion tokens, ARGV[3] cached tokens, ARGV[4] cost (nano-dollars)
-- The record's `usage` field is "prompt|completion|cached|calls|cost" (summed; cost in nano-dollars).
-- Returns the new field, or false when the record is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local add = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), 1, tonumber(ARGV[4])}
local i = 0
for v in string.gmatch(redis.call('HGET', KEYS[1], 'usage') or '', '%d+') do
  i = i + 1
  if add[i] then add[i] = add[i] + tonumber(v) end
end
local usage = table.concat(add, '|')
redis.call('HSET', KEYS[1], 'usage', usage)
return usage
