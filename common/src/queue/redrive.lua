-- Put dead-lettered tasks back on the pending list as new attempts.
-- Each goes to the back of its tenant's line (fair.lua is prepended).
-- KEYS[1] dead zset, KEYS[2] pending list (tickets), then what the ids reach, declared by the
-- caller (queue/declare.rs): each id's record, its stream, its tenant's line and its batch (named
-- from the queue's base and the record), and the ring
-- ARGV the ids to move: the oldest the caller read off the dead set, or the ids a tenant's
-- redrive names (its own); only those still dead are moved
-- Returns {redriven, dropped}; dropped ids had no record left (expired or never written).
local moved, dropped = 0, 0
local F = fair()
local base = fq_base(KEYS[2])
for _, id in ipairs(ARGV) do
  -- an id that is no longer dead (redriven already, or never was) is left alone
  local dead = redis.call('ZREM', KEYS[1], id) == 1
  local tkey = base .. 'task:' .. id
  if not dead then
    -- nothing
  elseif redis.call('EXISTS', tkey) == 1 and redis.call('HEXISTS', tkey, 'payload') == 1 then
    redis.call('HSET', tkey, 'status', 'queued', 'attempts', 0, 'rate_limited', 0)
    redis.call('HDEL', tkey, 'finished_at', 'started_at', 'result')
    local tenant = redis.call('HGET', tkey, 'tenant')
    -- a dead task holds no run; were a token left, its run is counted off once
    F.end_run(base, tkey, tenant)
    redis.call('PERSIST', tkey)
    -- a batch's request counted failed when it died: uncounted while the batch still counts, so
    -- its next final state counts it once (after the finalizer froze the counts, nothing moves)
    local b = redis.call('HGET', tkey, 'batch')
    if b and redis.call('HEXISTS', b, 'keep_until') == 1 and redis.call('HEXISTS', b, 'frozen') == 0 then
      redis.call('HINCRBY', b, 'failed', -1)
    end
    -- its old stream ended with a terminal event; the new life starts a new one, on demand
    -- (events.lua, "Streams on demand")
    redis.call('DEL', tkey .. ':events')
    redis.call('HDEL', tkey, 'ev', 'everr')
    fq_push(base, tenant, id, false)
    moved = moved + 1
  else
    redis.call('DEL', tkey)
    dropped = dropped + 1
  end
end
return {moved, dropped}
