-- Fails tasks whose tool outputs did not come in time (their `tool_timeout_secs`).
-- KEYS[1] waiting zset, KEYS[2] dead zset, then what the ids reach, declared by the caller from
-- its read of the due ids (queue/declare.rs): each one's record, stream and batch, and for a
-- workflow's node everything the workflow's step may reach (graph/wf.lua)
-- ARGV[1] now ms, ARGV[2] result TTL seconds, then per id the caller found due: the id and its
-- workflow's `nodes` as the caller read them ('' for a task of no workflow). A node whose
-- workflow's nodes changed since (a plan spawned children) is left for the next pass.
-- Returns how many tasks failed.
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
-- the queue's key base, '<prefix>:{<queue>}:', from the waiting key's name
local base = string.match(KEYS[1], '^(.*)waiting$')
local failed = 0
for i = 3, #ARGV - 1, 2 do
  local id = ARGV[i]
  local tkey = base .. 'task:' .. id
  local at = redis.call('ZSCORE', KEYS[1], id)
  local t = redis.call('HMGET', tkey, 'status', 'wf')
  local moved = t[2] and (redis.call('HGET', t[2], 'nodes') or '') ~= ARGV[i + 1]
  if at and tonumber(at) <= now and not moved then
    redis.call('ZREM', KEYS[1], id)
    if t[1] == 'requires_action' then
      redis.call('HSET', tkey, 'status', 'failed', 'finished_at', now,
        'error', 'tool_timeout: no tool outputs came within the task\'s tool_timeout_secs')
      redis.call('HDEL', tkey, 'pending_tool_calls', 'waiting_until')
      redis.call('EXPIRE', tkey, ttl)
      redis.call('ZADD', KEYS[2], now, id)
      ev_final(tkey, 'failed', ttl, 'tool_timeout: no tool outputs came within the task\'s tool_timeout_secs')
      if t[2] then wf().final(tkey, 'failed', nil, 'tool_timeout: no tool outputs came in time', now) end
      failed = failed + 1
    end
  end
end
if failed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000) end
return failed
