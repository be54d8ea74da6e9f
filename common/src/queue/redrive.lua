-- Put dead-lettered tasks back on the pending list as new attempts.
-- KEYS[1] dead zset, KEYS[2] pending list
-- ARGV[1] task key prefix, ARGV[2] most tasks to move
-- Returns {redriven, dropped}; dropped ids had no record left (expired or never written).
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local moved, dropped = 0, 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local tkey = ARGV[1] .. id
  if redis.call('EXISTS', tkey) == 1 and redis.call('HEXISTS', tkey, 'payload') == 1 then
    redis.call('HSET', tkey, 'status', 'queued', 'attempts', 0, 'rate_limited', 0)
    redis.call('HDEL', tkey, 'finished_at', 'started_at', 'result', 'token')
    redis.call('PERSIST', tkey)
    -- a batch's request counted failed when it died: uncounted while the batch still counts, so
    -- its next final state counts it once (after the finalizer froze the counts, nothing moves)
    local b = redis.call('HGET', tkey, 'batch')
    if b and redis.call('HEXISTS', b, 'keep_until') == 1 and redis.call('HEXISTS', b, 'frozen') == 0 then
      redis.call('HINCRBY', b, 'failed', -1)
    end
    -- its old stream ended with a terminal event; the new life starts a new one
    redis.call('DEL', tkey .. ':events')
    redis.call('LPUSH', KEYS[2], id)
    moved = moved + 1
  else
    redis.call('DEL', tkey)
    dropped = dropped + 1
  end
end
return {moved, dropped}
