-- A run's model asked for client-side tools: record the step and wait for the client's outputs,
-- holding no worker slot. Only if that run still owns the task (fence.lua is prepended).
-- KEYS[1] task hash, KEYS[2] worker in-flight list, KEYS[3] active zset, KEYS[4] waiting zset,
-- KEYS[5] the queue's `running` hash (runs in flight per tenant, fair.lua), then the task's
-- stream and its workflow's keys when it is a node (the caller read its record, queue/declare.rs)
-- ARGV[1] id, ARGV[2] run token, ARGV[3] now ms, ARGV[4] the step's messages to append to the
-- transcript (JSON, one per line), ARGV[5] the pending tool calls (JSON array), ARGV[6] the time
-- the outputs are due by (ms), ARGV[7] the step's call usage ("prompt|completion|cached|cost", or '')
-- Returns 'requires_action'; or, writing nothing, the verdict a resend already got, the final
-- status, 'missing' or 'stale' (see fence.lua).
local token = ARGV[2]
local t = redis.call('HMGET', KEYS[1], 'status', 'token', 'reported', 'usage', 'transcript', 'tenant')
local refused = fence(KEYS[1], KEYS[2], ARGV[1], token, t[1], t[2], t[3])
if refused then return refused end
redis.call('ZREM', KEYS[3], ARGV[1])
-- the fence saw this run's token, and the HDEL below removes it: the run ends here
fq_ended(KEYS[5], t[6])
local usage = add_usage(t[4], ARGV[7])
if usage then
  redis.call('HSET', KEYS[1], 'usage', usage)
  ev_usage(KEYS[1], usage)
end
-- no new messages: a redriven task whose calls were never answered waits for them again
if ARGV[4] ~= '' then
  local transcript = ARGV[4]
  if t[5] and t[5] ~= '' then transcript = t[5] .. '\n' .. ARGV[4] end
  redis.call('HSET', KEYS[1], 'transcript', transcript)
  redis.call('HINCRBY', KEYS[1], 'steps', 1)
end
redis.call('HSET', KEYS[1], 'status', 'requires_action', 'pending_tool_calls', ARGV[5],
  'waiting_until', ARGV[6], 'reported', token .. '|requires_action')
redis.call('HDEL', KEYS[1], 'token', 'error')
redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[1])
ev_status(KEYS[1], 'requires_action', {due_ms = tonumber(ARGV[6])}, '"pending_tool_calls":' .. ARGV[5])
return 'requires_action'
