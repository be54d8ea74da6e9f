-- Fails tasks whose tool outputs did not come in time (their `tool_timeout_secs`).
-- KEYS[1] waiting zset, KEYS[2] dead zset
-- ARGV[1] task key prefix, ARGV[2] now ms, ARGV[3] result TTL seconds, ARGV[4] most ids per call
-- Task keys are ARGV[1] .. id: the queue's hash tag, so the same cluster slot as KEYS.
-- Returns how many tasks failed.
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local failed = 0
for _, id in ipairs(due) do
  local tkey = ARGV[1] .. id
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', tkey, 'status') == 'requires_action' then
    redis.call('HSET', tkey, 'status', 'failed', 'finished_at', now,
      'error', 'tool_timeout: no tool outputs came within the task\'s tool_timeout_secs')
    redis.call('HDEL', tkey, 'pending_tool_calls', 'waiting_until')
    redis.call('EXPIRE', tkey, ttl)
    redis.call('ZADD', KEYS[2], now, id)
    ev_final(tkey, 'failed', ttl, 'tool_timeout: no tool outputs came within the task\'s tool_timeout_secs')
    wf().final(tkey, 'failed', nil, 'tool_timeout: no tool outputs came in time', now)
    failed = failed + 1
  end
end
if failed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000) end
return failed
