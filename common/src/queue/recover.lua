-- Give a lost worker's in-flight tasks back to the head of pending, if its heartbeat is gone.
-- Its runs are fenced out: their token is cleared, so a late report from that worker (stalled, not
-- dead) is refused. A lost run already counted as an attempt (fetch counts at start) and stays counted.
-- Each id goes to the head of its tenant's line; a ticket its blocking wait had moved (fetch.lua
-- never ran for it) goes back to pending as a ticket (fair.lua is prepended).
-- KEYS[1] heartbeat key of the lost worker, KEYS[2] its in-flight list, KEYS[3] pending list
-- (tickets), KEYS[4] workers set, KEYS[5] active zset, then what the ids reach, declared by the
-- caller from its read of the list (queue/declare.rs): each id's record, its stream, its tenant's
-- line and its workflow's keys (named from the queue's base and the record), the ring and the
-- `running` hash
-- ARGV[1] the lost worker's id, ARGV[2..] its in-flight list as the caller read it
-- Returns the number of ids given back to pending, -1 when the worker is alive after all, or -2
-- when the list is not what the caller read (nothing written: read it again).
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
if #ids ~= #ARGV - 1 then return -2 end
for i, id in ipairs(ids) do
  if ARGV[i + 1] ~= id then return -2 end
end
redis.call('DEL', KEYS[2])
local F = fair()
local base = fq_base(KEYS[3])
-- oldest first (the tail), so they keep their order at the head of pending
for i = #ids, 1, -1 do
  local id = ids[i]
  if id == F.TICKET then
    F.ticket_back(base)
  else
    local tkey = base .. 'task:' .. id
    local t = redis.call('HMGET', tkey, 'status', 'worker', 'tenant')
    local status = t[1]
    if status == 'running' and t[2] == ARGV[1] then
      redis.call('HSET', tkey, 'status', 'queued')
      F.end_run(base, tkey, t[3])
      redis.call('HINCRBY', tkey, 'recovered', 1)
      redis.call('ZREM', KEYS[5], id)
      fq_push(base, t[3], id, true)
      ev_status(tkey, 'queued', {reason = 'recovered'})
      n = n + 1
    elseif not status or status == 'queued' or status == 'retrying' then
      fq_push(base, t[3], id, true)
      n = n + 1
    end
    -- finished, cancelled, or a duplicate copy of another worker's run: dropped
  end
end
redis.call('SREM', KEYS[4], ARGV[1])
return n
