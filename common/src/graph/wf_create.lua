-- Write a workflow and every node's task, atomically; queue the nodes with no parents.
-- KEYS[1] the workflow hash, KEYS[2] the queue's pending list (tickets; the queue's key base is
-- taken from it), KEYS[3] (only with an Idempotency-Key) the key's record, then every key the
-- writes reach (graph/mod.rs declares them): each node's task record, the lanes of the nodes'
-- agents, the workflow's stream, the tenant's line, the ring, the lanes set and `recent`
-- ARGV[1] workflow id, ARGV[2] now ms, ARGV[3] metadata JSON or '', ARGV[4] max cost in
-- nano-dollars or '', ARGV[5] result TTL seconds (kept after the workflow ends), ARGV[6] '1' when
-- an Idempotency-Key is given, ARGV[7] queue, ARGV[8] node count N, then per node
-- 10 values: id, task id, payload JSON, max_attempts, parent count, dependents (space-separated),
-- on_failure (f/c/s), agent id or '', kind ('plan' or ''), depends_on (space-separated); then the
-- tenant ('' for the default tenant; kept on the workflow and on every node's task, whose queued
-- ids go to that tenant's line, fair.lua)
-- Returns {1, id} when written, {0, existing id} when the Idempotency-Key was used already.
if ARGV[6] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', tonumber(ARGV[5]))
end
local W = wf()
local wf = KEYS[1]
local now, base, queue = ARGV[2], fq_base(KEYS[2]), ARGV[7]
local n = tonumber(ARGV[8])
local tenant = ARGV[9 + n * 10] or ''
local ids = {}
redis.call('HSET', wf, 'status', 'running', 'created_at', now, 'base', base, 'ttl', ARGV[5],
  'queue', queue, 'open', n)
if tenant ~= '' then redis.call('HSET', wf, 'tenant', tenant) end
if ARGV[3] ~= '' then redis.call('HSET', wf, 'metadata', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', wf, 'max_cost', ARGV[4], 'cost_spent', 0) end
local roots = {}
for i = 0, n - 1 do
  local a = 9 + i * 10
  local id, tid = ARGV[a], ARGV[a + 1]
  ids[#ids + 1] = id
  redis.call('HSET', wf, 't:' .. id, tid, 's:' .. id, 'blocked', 'p:' .. id, ARGV[a + 4],
    'd:' .. id, ARGV[a + 5], 'f:' .. id, ARGV[a + 6], 'a:' .. id, ARGV[a + 7],
    'k:' .. id, ARGV[a + 8], 'par:' .. id, ARGV[a + 9])
  W.task(base, wf, id, tid, queue, now, ARGV[a + 3], ARGV[a + 2], tenant)
  if tonumber(ARGV[a + 4]) == 0 then roots[#roots + 1] = id end
end
redis.call('HSET', wf, 'nodes', table.concat(ids, ' '))
ev_add(wf .. ':events', 'status', '{"status":"running"}')
for _, id in ipairs(roots) do W.ready(wf, base, id) end
return {1, ARGV[1]}
