-- Write a task record and queue its id, atomically; with an idempotency key, at most once; within
-- the tenant's max_pending in this queue, else nothing is written (fair.lua is prepended).
-- KEYS[1] task hash, KEYS[2] pending list (tickets), then (each only when given) the idempotency
-- key, and the agent's lane list and the lanes set
-- ARGV[1] id, ARGV[2] queue, ARGV[3] created_at ms, ARGV[4] max_attempts, ARGV[5] payload JSON,
-- ARGV[6] idempotency TTL seconds, ARGV[7] '1' when an idempotency key is given, ARGV[8] '1' when
-- the task is an agent's (lane keys given), ARGV[9] the agent id, ARGV[10] the tenant ('' for the
-- default tenant: its records carry no `tenant` field)
-- The tenant's line ('<base>pending:<tenant>'), the ring and the `tenants` hash are built from
-- KEYS[2] (same hash tag, same slot).
-- An agent's tasks run one at a time in enqueue order: each joins its agent's lane, and only the
-- lane's head is in pending; the next is pushed when the head is final (lane.lua).
-- Returns {1, id} when enqueued, {0, existing_id} when the idempotency key was already used,
-- {2, pending} when the tenant already has `p:<tenant>` (max_pending) tasks in its line here.
local idem = ARGV[7] == '1'
if idem then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    return {0, existing}
  end
end
local base = fq_base(KEYS[2])
local tenant = ARGV[10] or ''
local tname = tenant
if tname == '' then tname = 'default' end
local cap = tonumber(redis.call('HGET', base .. 'tenants', 'p:' .. tname))
if cap then
  local queued = redis.call('LLEN', base .. 'pending:' .. tname)
  if queued >= cap then
    return {2, tostring(queued)}
  end
end
if tenant == '' then
  redis.call('HSET', KEYS[1],
    'queue', ARGV[2], 'status', 'queued', 'attempts', 0, 'rate_limited', 0,
    'max_attempts', ARGV[4], 'payload', ARGV[5], 'created_at', ARGV[3])
else
  redis.call('HSET', KEYS[1],
    'queue', ARGV[2], 'status', 'queued', 'attempts', 0, 'rate_limited', 0,
    'max_attempts', ARGV[4], 'payload', ARGV[5], 'created_at', ARGV[3], 'tenant', tenant)
end
-- the newest tasks, for GET /v1/tasks (keys.rs `recent`): '<id>~<tenant>~<agent id>' (the agent
-- key's last part: the lane name carries the tenant), score 0 so it sorts by id (UUID v7, by
-- time); kept to the newest 10000 (keys.rs RECENT_CAP) in this same step
redis.call('ZADD', base .. 'recent', 0,
  ARGV[1] .. '~' .. tenant .. '~' .. string.match(ARGV[9] or '', '[^~]*$'))
redis.call('ZREMRANGEBYRANK', base .. 'recent', 0, -10001)
local runnable = true
if ARGV[8] == '1' then
  local lane = idem and KEYS[4] or KEYS[3]
  local lanes = idem and KEYS[5] or KEYS[4]
  runnable = redis.call('RPUSH', lane, ARGV[1]) == 1
  redis.call('SADD', lanes, ARGV[9])
  if runnable then redis.call('HSET', KEYS[1], 'lane_ready', 1) end
end
if runnable then
  fq_push(base, tenant, ARGV[1], false)
end
if idem then
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[6])
end
return {1, ARGV[1]}
