-- One task (fair.lua and enqueue_item.lua are prepended; see enqueue_item.lua for the step).
-- KEYS[1] task hash, KEYS[2] pending list (tickets), then (each only when given) the idempotency
-- key, and the agent's lane list and the lanes set; then the tenant's line, the ring, `tenants`
-- and `recent` (enqueue_item.lua reaches them from the queue's base)
-- ARGV[1] id, ARGV[2] queue, ARGV[3] created_at ms, ARGV[4] max_attempts, ARGV[5] payload JSON,
-- ARGV[6] idempotency TTL seconds, ARGV[7] '1' when an idempotency key is given, ARGV[8] '1' when
-- the task is an agent's (lane keys given), ARGV[9] the agent id, ARGV[10] the tenant ('' for the
-- default tenant)
-- Returns {1, id} when enqueued, {0, existing_id} when the idempotency key was already used,
-- {2, pending} when the tenant already has `p:<tenant>` (max_pending) tasks in its line here.
local n = 3
local ikey, lane, lanes
if ARGV[7] == '1' then
  ikey = KEYS[3]
  n = 4
end
if ARGV[8] == '1' then
  lane = KEYS[n]
  lanes = KEYS[n + 1]
end
local g = enqueue_group(fq_base(KEYS[2]))
local code, value = enqueue_item(g, KEYS[1], ikey, lane, lanes, ARGV[1], ARGV[2], ARGV[3],
  ARGV[4], ARGV[5], ARGV[6], ARGV[9] or '', ARGV[10] or '')
enqueue_flush(g)
return {code, value}
