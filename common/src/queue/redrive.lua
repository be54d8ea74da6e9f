-- Put dead-lettered tasks back on the pending list as new attempts.
-- Each goes to the back of its tenant's line (fair.lua is prepended).
-- KEYS[1] dead zset, KEYS[2] pending list (tickets; the tenants' lines are built from it)
-- ARGV[1] task key prefix, ARGV[2] most tasks to move, then (optional) the exact ids to move:
-- a tenant's redrive names its own dead ids, and only those still dead are moved
-- Returns {redriven, dropped}; dropped ids had no record left (expired or never written).
local ids
if #ARGV > 2 then
  ids = {}
  for i = 3, math.min(#ARGV, 2 + tonumber(ARGV[2])) do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
end
local moved, dropped = 0, 0
local F = fair()
local base = fq_base(KEYS[2])
for _, id in ipairs(ids) do
  -- an id that is no longer dead (redriven already, or never was) is left alone
  local dead = redis.call('ZREM', KEYS[1], id) == 1
  local tkey = ARGV[1] .. id
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
