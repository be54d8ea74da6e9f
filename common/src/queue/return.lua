-- Put an id this worker moved into its in-flight list back on pending, unrun: an id taken while
-- the worker was stopping, an orphan of a fetch whose reply was lost, or what a drain leaves.
-- It goes to the head of its tenant's line; a ticket ('~', moved by a blocking wait whose fetch
-- never ran) goes back to pending as a ticket (fair.lua is prepended).
-- KEYS[1] task hash (for a ticket: any key of the queue's slot), KEYS[2] this worker's in-flight
-- list, KEYS[3] pending list (tickets), KEYS[4] active zset, then (not for a ticket) the task's
-- tenant's line, the default tenant's, the ring and the `running` hash (named from the queue's
-- base; the caller read the tenant, queue/declare.rs)
-- ARGV[1] id (or '~'), ARGV[2] worker id, ARGV[3] run token, or '' for any run of this worker (an
-- orphan whose fetch reply was lost, so its token never reached the worker)
-- Returns 'queued' when given back, 'dropped' for a copy that was not this worker's to give back
-- (finished, cancelled, or another run's), 'absent' when the id was not in the list (nothing done).
local id = ARGV[1]
if redis.call('LREM', KEYS[2], -1, id) == 0 then return 'absent' end
local F = fair()
local base = fq_base(KEYS[3])
if id == F.TICKET then
  F.ticket_back(base)
  return 'queued'
end
local t = redis.call('HMGET', KEYS[1], 'status', 'worker', 'token', 'attempts', 'tenant')
local status = t[1]
if not status then
  -- no record: fetch dead-letters it as poison
  fq_push(base, nil, id, true)
  return 'queued'
end
if status == 'queued' or status == 'retrying' then
  fq_push(base, t[5], id, true)
  return 'queued'
end
if status ~= 'running' or t[2] ~= ARGV[2] or (ARGV[3] ~= '' and t[3] ~= ARGV[3]) then
  return 'dropped'
end
-- this worker's run, never started on the LLM: the attempt is not counted
local attempts = tonumber(t[4]) or 0
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
F.end_run(base, KEYS[1], t[5])
redis.call('ZREM', KEYS[4], id)
fq_push(base, t[5], id, true)
return 'queued'
