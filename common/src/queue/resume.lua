-- The client's tool outputs: append them to the transcript and queue the task again, at the head
-- of pending (its conversation is under way). The resumed run is not a new attempt: `attempts`
-- goes down by the one fetch.lua will add back.
-- KEYS[1] task hash, KEYS[2] waiting zset, KEYS[3] pending list (tickets: the task goes to the
-- head of its tenant's line, fair.lua is prepended), then the task's stream, its tenant's line,
-- its workflow's keys when it is a node, and the ring (the caller read its record,
-- queue/declare.rs)
-- ARGV[1] id, ARGV[2] the pending tool calls the outputs answer (JSON, as read: a concurrent
-- submission that already resumed the task makes this one a no-op), ARGV[3] the tool messages
-- (JSON, one per line)
-- Returns 'ok'; 'missing'; 'changed' (the calls are no longer the ones answered); or the status
-- the task has when it is not waiting for tool outputs.
local t = redis.call('HMGET', KEYS[1], 'status', 'pending_tool_calls', 'transcript', 'attempts', 'tenant')
if not t[1] then return 'missing' end
if t[1] ~= 'requires_action' then return t[1] end
if t[2] ~= ARGV[2] then return 'changed' end
local transcript = ARGV[3]
if t[3] and t[3] ~= '' then transcript = t[3] .. '\n' .. ARGV[3] end
local attempts = tonumber(t[4]) or 0
redis.call('HSET', KEYS[1], 'status', 'queued', 'transcript', transcript,
  'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'pending_tool_calls', 'waiting_until')
redis.call('ZREM', KEYS[2], ARGV[1])
fq_push(fq_base(KEYS[3]), t[5], ARGV[1], true)
ev_status(KEYS[1], 'queued', {reason = 'tool_outputs'})
return 'ok'
