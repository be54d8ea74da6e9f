-- Prepended to lane_release.lua (see steps.rs): moves an agent's lane on.
-- The lane (LIST, enqueue order) holds the agent's tasks that are not final; its head is the one
-- allowed to run. Final or vanished heads are dropped; the first live head is made runnable once
-- (`lane_ready`): pushed to the back of its tenant's line when it is still only queued (fair.lua
-- is prepended before this file).
-- ids: the lane's first entries as the caller read them, whose records and tenant lines it
-- declared; the walk goes no further than those.
-- Returns 1 when the lane still holds a task, 0 when it is empty, 2 when its head is not the
-- next id the caller read (the lane changed, or it holds more final tasks than were read): the
-- heads dropped so far stay dropped, and the caller reads the lane again.
local function lane_release(lane, pending, ids)
  local base = fq_base(pending)
  local i = 0
  while true do
    local head = redis.call('LINDEX', lane, 0)
    if not head then return 0 end
    i = i + 1
    if head ~= ids[i] then return 2 end
    local tkey = base .. 'task:' .. head
    local t = redis.call('HMGET', tkey, 'status', 'lane_ready', 'tenant')
    local st = t[1]
    if (not st) or st == 'succeeded' or st == 'failed' or st == 'cancelled' then
      redis.call('LPOP', lane)
    else
      if not t[2] then
        redis.call('HSET', tkey, 'lane_ready', 1)
        if st == 'queued' then fq_push(base, t[3], head, false) end
      end
      return 1
    end
  end
end
