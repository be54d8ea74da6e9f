-- Give a lost worker's in-flight tasks back to the head of pending, if its heartbeat is gone.
-- Its runs are fenced out: their token is cleared, so a late report from that worker (stalled, not
-- dead) is refused. A lost run already counted as an attempt (fetch counts at start) and stays counted.
-- Each id goes to the head of its tenant's line; a ticket its blocking wait had moved (fetch.lua
-- never ran for it) goes back to pending as a ticket (fair.lua is prepended).
-- KEYS[1] heartbeat key of the lost worker, KEYS[2] its in-flight list, KEYS[3] pending list
-- (tickets; the tenants' lines and the `running` hash are built from it), KEYS[4] workers set,
-- KEYS[5] active zset
-- ARGV[1] the lost worker's id, ARGV[2] task key prefix
-- Returns the number of ids given back to pending, or -1 when the worker is alive after all.
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
local F = fair()
local base = fq_base(KEYS[3])
-- oldest first (the tail), so they keep their order at the head of pending
for i = #ids, 1, -1 do
  local id = ids[i]
  if id == F.TICKET then
    F.ticket_back(base)
  else
    local tkey = ARGV[2] .. id
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
