-- One task's enqueue step, shared by enqueue.lua (one task per call) and enqueue_many.lua (a
-- group: POST /v1/tasks/batch and the api's group commit of concurrent POST /v1/tasks); fair.lua
-- is prepended before it. Writes the task record and queues the id, atomically; with an
-- idempotency key, at most once; within the tenant's max_pending in this queue, else nothing is
-- written for the item.
-- An agent's tasks run one at a time in enqueue order: each joins its agent's lane, and only the
-- lane's head is in pending; the next is pushed when the head is final (lane.lua).
--
-- A call's items share their list writes: each item's record (and lane, idempotency key) is
-- written at once, while its id's place in its tenant's line, its ticket and its `recent` entry
-- are gathered in the group `g` and written by enqueue_flush() with one variadic command per
-- list for the whole call (LPUSH a b c leaves the list as three LPUSHes would). That takes a
-- 100-task call from 5 commands per task to 1 (the HSET) plus a few per call. The script is one
-- atomic step, so nobody sees the records before their ids are queued.

-- A group for the queue whose keys start with base ('<prefix>:{<queue>}:', from the pending key:
-- the tenants' lines, the ring, `tenants` and `recent` share its hash tag, hence its slot).
local function enqueue_group(base)
  return {base = base, caps = {}, queued = {}, lines = {}, order = {}, tickets = 0, recent = {}}
end

-- tkey the task hash; idem the idempotency key or nil; lane and lanes the agent's lane list and
-- the lanes set, or nil for a task without an agent; id, queue, created (ms), max_attempts,
-- payload (JSON), idem_ttl (s), agent (the lane's agent key, '' for none), tenant ('' for the
-- default tenant: its records carry no `tenant` field).
-- Returns 1, id when enqueued; 0, existing_id when the idempotency key was already used; 2,
-- pending when the tenant already has `p:<tenant>` (max_pending) tasks in its line here.
local function enqueue_item(g, tkey, idem, lane, lanes, id, queue, created, max_attempts,
    payload, idem_ttl, agent, tenant)
  if idem then
    local existing = redis.call('GET', idem)
    if existing then
      return 0, existing
    end
  end
  local tname = tenant
  if tname == '' then tname = 'default' end
  local cap = g.caps[tname]
  if cap == nil then
    cap = tonumber(redis.call('HGET', g.base .. 'tenants', 'p:' .. tname)) or false
    g.caps[tname] = cap
  end
  if cap then
    -- read once per tenant, before this group's first push for it; counted on from there
    local queued = g.queued[tname]
    if queued == nil then
      queued = redis.call('LLEN', g.base .. 'pending:' .. tname)
      g.queued[tname] = queued
    end
    if queued >= cap then
      return 2, tostring(queued)
    end
  end
  -- `attempts` and `rate_limited` start absent (read as 0 everywhere: `tonumber(x) or 0` here,
  -- `TaskView::from_hash`), not 0: each field costs the HSET, and a number argument costs Lua a
  -- number-to-string conversion on top; 2 of 7 fields were ~1 µs of Redis per task in a bulk
  -- enqueue (loadtest/bench/README.md, "Bulk enqueue")
  if tenant == '' then
    redis.call('HSET', tkey,
      'queue', queue, 'status', 'queued',
      'max_attempts', max_attempts, 'payload', payload, 'created_at', created)
  else
    redis.call('HSET', tkey,
      'queue', queue, 'status', 'queued',
      'max_attempts', max_attempts, 'payload', payload, 'created_at', created, 'tenant', tenant)
  end
  -- the newest tasks, for GET /v1/tasks (keys.rs `recent`): '<id>~<tenant>~<agent id>' (the agent
  -- key's last part: the lane name carries the tenant), score 0 so it sorts by id (UUID v7, by
  -- time); kept to the newest 10000 (keys.rs RECENT_CAP) by enqueue_flush(); the score is the
  -- string '0', which Redis takes as it is (a Lua number would be formatted for every entry)
  local recent = g.recent
  recent[#recent + 1] = '0'
  if agent == '' then
    recent[#recent + 1] = id .. '~' .. tenant .. '~'
  else
    recent[#recent + 1] = id .. '~' .. tenant .. '~' .. string.match(agent, '[^~]*$')
  end
  local runnable = true
  if lane then
    runnable = redis.call('RPUSH', lane, id) == 1
    redis.call('SADD', lanes, agent)
    if runnable then redis.call('HSET', tkey, 'lane_ready', 1) end
  end
  if runnable then
    local line = g.lines[tname]
    if not line then
      line = {}
      g.lines[tname] = line
      g.order[#g.order + 1] = tname
    end
    line[#line + 1] = id
    g.tickets = g.tickets + 1
    if g.queued[tname] then g.queued[tname] = g.queued[tname] + 1 end
  end
  if idem then
    redis.call('SET', idem, id, 'EX', idem_ttl)
  end
  return 1, id
end

-- Writes a group's gathered list entries (fair.lua's fq_push, for many ids at once): each
-- tenant's ids at the back of its line (a line that was empty joins the ring at its end), one
-- ticket per id in `pending`, the `recent` entries, and the trim of `recent`.
local function enqueue_flush(g)
  local base = g.base
  for _, tname in ipairs(g.order) do
    local ids = g.lines[tname]
    if redis.call('LPUSH', base .. 'pending:' .. tname, unpack(ids)) == #ids then
      redis.call('RPUSH', base .. 'ring', tname)
    end
  end
  if g.tickets > 0 then
    local tickets = {}
    for i = 1, g.tickets do tickets[i] = '~' end
    redis.call('LPUSH', base .. 'pending', unpack(tickets))
  end
  if #g.recent > 0 then
    redis.call('ZADD', base .. 'recent', unpack(g.recent))
    redis.call('ZREMRANGEBYRANK', base .. 'recent', 0, -10001)
  end
end
