-- Cancel a task that has not finished. It is taken off every list of the queue now; the run's
-- token is cleared, so the owner's report writes nothing. The owner's in-flight list is its own:
-- the worker drops its copy when it hears of the cancel (the message below, or its poll of its
-- runs' records), or when its report is answered `cancelled` (fence.lua); recovery drops it for a
-- lost worker.
-- KEYS[1] task hash, KEYS[2] pending list (tickets), KEYS[3] delayed zset, KEYS[4] active zset,
-- KEYS[5] throttled zset, KEYS[6] waiting zset (tasks waiting for tool outputs), KEYS[7] its
-- stream, then what the cancel reaches through the record, declared by the caller from its read of
-- it (queue/declare.rs): the tenant's line, the ring, `turns` and `running`, and for a
-- workflow's node everything the workflow's step may reach (graph/wf.lua)
-- ARGV[1] id, ARGV[2] now ms, ARGV[3] result TTL seconds, ARGV[4] the queue's cancel channel: a
-- running task's id is published there, so the worker running it aborts its LLM call now instead
-- of paying for an answer nobody will keep; ARGV[5] the workflow's `nodes` as the caller read
-- them ('' for a task of no workflow)
-- Returns 'ok' when cancelled now, 'missing', the final status the task already had, or, writing
-- nothing, 'reread' when the workflow's nodes are not the ones the caller read (a plan spawned
-- children since: read again).
local t = redis.call('HMGET', KEYS[1], 'status', 'tenant', 'wf')
local status = t[1]
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
if t[3] and (redis.call('HGET', t[3], 'nodes') or '') ~= ARGV[5] then return 'reread' end
local F = fair()
local base = fq_base(KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
F.end_run(base, KEYS[1], t[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
-- out of its tenant's line, with its ticket (an id queued before tickets existed, still in
-- pending itself, is dropped by fetch.lua when it comes up)
F.remove(base, t[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[1], 'pending_tool_calls', 'waiting_until')
if status == 'running' then
  redis.call('PUBLISH', ARGV[4], ARGV[1])
end
ev_final(KEYS[1], 'cancelled', tonumber(ARGV[3]), 'cancelled by request')
-- a workflow's node: its on_failure decides what happens to the rest (wf.lua)
if t[3] then wf().final(KEYS[1], 'cancelled', nil, 'cancelled by request', tonumber(ARGV[2])) end
return 'ok'
