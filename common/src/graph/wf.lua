-- Workflow bookkeeping, shared by every script that can make a task final (prepended to them,
-- like fence.lua: a Redis script cannot import another). docs/architecture.md ("Workflows").
-- A workflow is one HASH, '<base>wf:<id>', in its queue's slot (base = '<prefix>:{<queue>}:'),
-- with fields: status (running, succeeded, failed, cancelled), created_at, finished_at, error,
-- metadata, max_cost, cost_spent, base, ttl, queue, nodes (node ids, space-separated, in order),
-- open (nodes not final), and per node n: t:n its task id, s:n its state (blocked, queued, then
-- succeeded, failed, cancelled or skipped), p:n parents not final yet, d:n its dependents,
-- f:n its on_failure (f fail_workflow, c continue, s skip), a:n its agent, k:n 'plan',
-- par:n its depends_on, o:n its output, e:n its error, u:n its usage, c:n a plan's children.
-- Node tasks carry the fields wf (the workflow's key) and node, and tenant when the workflow has one
-- (field tenant of the workflow too: every node belongs to the workflow's tenant).
-- fair.lua must be prepended before this file (queued nodes go to their tenant's line).
-- The library is one function, `wf()`, returning the table of its functions: a script runs its
-- top level on every call, and defining the functions there would cost every plain task's fetch
-- and result a few closures it never uses; now they are built only where a workflow is touched.
local function wf()
  local WF_FINAL = {succeeded = true, failed = true, cancelled = true, skipped = true}

  local function wf_words(s)
    local out = {}
    if s then
      for w in string.gmatch(s, '%S+') do out[#out + 1] = w end
    end
    return out
  end

  -- Writes a node's task record (status queued, in no list yet). tenant: the workflow's, or nil
  -- or '' for the default tenant (no field).
  local function wf_task(base, wf, n, tid, queue, now, max_attempts, payload, tenant)
    local tkey = base .. 'task:' .. tid
    redis.call('HSET', tkey,
      'queue', queue, 'status', 'queued',
      'max_attempts', max_attempts, 'payload', payload, 'created_at', now, 'wf', wf, 'node', n)
    if tenant and tenant ~= '' then redis.call('HSET', tkey, 'tenant', tenant) end
    -- the queue's newest tasks, as in enqueue.lua (a:n, the lane name, was written just before)
    local agent = string.match(redis.call('HGET', wf, 'a:' .. n) or '', '[^~]*$')
    redis.call('ZADD', base .. 'recent', '0', tid .. '~' .. (tenant or '') .. '~' .. agent)
    redis.call('ZREMRANGEBYRANK', base .. 'recent', 0, -10001)
  end

  -- A node whose parents are all final goes in line: its agent's lane when it has one (only the
  -- lane's head is pending, as in enqueue.lua), else the back of its tenant's line.
  local function wf_ready(wf, base, n)
    local r = redis.call('HMGET', wf, 't:' .. n, 'a:' .. n)
    local tid, agent = r[1], r[2]
    redis.call('HSET', wf, 's:' .. n, 'queued')
    local tkey = base .. 'task:' .. tid
    -- a blocked node cancelled on its own (DELETE /v1/tasks/{id}) stays out
    local t = redis.call('HMGET', tkey, 'status', 'tenant')
    if t[1] ~= 'queued' then return end
    ev_add(wf .. ':events', 'node', cjson.encode({node = n, task_id = tid, status = 'queued'}))
    local runnable = true
    if agent and agent ~= '' then
      runnable = redis.call('RPUSH', base .. 'lane:' .. agent, tid) == 1
      redis.call('SADD', base .. 'lanes', agent)
      if runnable then redis.call('HSET', tkey, 'lane_ready', 1) end
    end
    if runnable then fq_push(base, t[2], tid, false) end
  end

  -- Cancels a node's task as cancel.lua does, and tells a worker running it to drop the call
  -- (the 'cancels' channel). A cancelled id left in pending is dropped by fetch.lua when it comes
  -- up: removing it here would scan the list once per node.
  local function wf_cancel_task(base, tid, now, ttl, why)
    local tkey = base .. 'task:' .. tid
    local t = redis.call('HMGET', tkey, 'status', 'tenant')
    local st = t[1]
    if not st or st == 'succeeded' or st == 'failed' or st == 'cancelled' then return end
    redis.call('HSET', tkey, 'status', 'cancelled', 'finished_at', now)
    if why then redis.call('HSET', tkey, 'error', why) end
    -- the token's HDEL answers 1 only for a run in flight: it is counted off once
    if redis.call('HDEL', tkey, 'token') == 1 then fq_ended(base .. 'running', t[2]) end
    redis.call('HDEL', tkey, 'pending_tool_calls', 'waiting_until')
    redis.call('EXPIRE', tkey, ttl)
    ev_final(tkey, 'cancelled', ttl, why or 'cancelled')
    redis.call('ZREM', base .. 'delayed', tid)
    redis.call('ZREM', base .. 'active', tid)
    redis.call('ZREM', base .. 'throttled', tid)
    redis.call('ZREM', base .. 'waiting', tid)
    -- its owner drops its in-flight copy when it hears (cancel.lua says how)
    if st == 'running' then redis.call('PUBLISH', base .. 'cancels', tid) end
  end

  local function wf_close(wf, status, now, ttl, reason)
    redis.call('HSET', wf, 'status', status, 'finished_at', now, 'open', 0)
    if reason then redis.call('HSET', wf, 'error', reason) end
    redis.call('EXPIRE', wf, ttl)
    redis.call('DEL', wf .. ':holds')
    local ekey = wf .. ':events'
    if status == 'succeeded' then
      ev_add(ekey, 'done', '{"status":"succeeded"}')
    else
      ev_add(ekey, 'error', cjson.encode({status = status, error = reason or status}))
    end
    redis.call('EXPIRE', ekey, ttl)
  end

  -- Ends a running workflow (fail_workflow, or DELETE): every node not final is cancelled.
  local function wf_abort(wf, base, now, ttl, status, reason)
    local why = status == 'cancelled' and 'workflow cancelled' or ('workflow failed: ' .. reason)
    for _, n in ipairs(wf_words(redis.call('HGET', wf, 'nodes'))) do
      local r = redis.call('HMGET', wf, 's:' .. n, 't:' .. n)
      if not WF_FINAL[r[1]] then
        redis.call('HSET', wf, 's:' .. n, 'cancelled')
        if r[2] then wf_cancel_task(base, r[2], now, ttl, why) end
      end
    end
    wf_close(wf, status, now, ttl, reason)
  end

  -- A node's task became final (status succeeded, failed or cancelled): record it, apply the
  -- node's on_failure, spawn a plan's children, count down the dependents and queue those whose
  -- last parent this was, and close the workflow when no node is open. A node already final, a
  -- task of no workflow and a closed workflow are left alone, so a resend changes nothing.
  -- spawn: a plan's children, {{n = node id, t = task id, p = payload JSON, m = max_attempts,
  -- a = agent id or ''}, ...}, or nil.
  local function wf_final(tkey, status, output, err, now, spawn)
    local w = redis.call('HMGET', tkey, 'wf', 'node', 'usage')
    local wf, n = w[1], w[2]
    if not wf or not n then return end
    local h = redis.call('HMGET', wf, 'status', 's:' .. n, 'base', 'ttl', 'f:' .. n, 'd:' .. n, 'queue', 'tenant')
    if h[1] ~= 'running' or WF_FINAL[h[2]] then return end
    local base, ttl, policy = h[3], tonumber(h[4]) or 86400, h[5] or 'f'
    redis.call('HSET', wf, 's:' .. n, status)
    if output then redis.call('HSET', wf, 'o:' .. n, output) end
    if err and err ~= '' then redis.call('HSET', wf, 'e:' .. n, err) end
    if w[3] then redis.call('HSET', wf, 'u:' .. n, w[3]) end
    local open = redis.call('HINCRBY', wf, 'open', -1)
    local deps = wf_words(h[6])
    if status ~= 'succeeded' then
      if policy == 's' then
        -- every descendant is skipped (they are all still blocked: they wait for this node)
        local why = 'skipped: node ' .. n .. ' ' .. status
        local stack = deps
        while #stack > 0 do
          local d = table.remove(stack)
          local r = redis.call('HMGET', wf, 's:' .. d, 't:' .. d, 'd:' .. d)
          if not WF_FINAL[r[1]] then
            redis.call('HSET', wf, 's:' .. d, 'skipped', 'e:' .. d, why)
            if r[2] then wf_cancel_task(base, r[2], now, ttl, why) end
            open = redis.call('HINCRBY', wf, 'open', -1)
            for _, x in ipairs(wf_words(r[3])) do stack[#stack + 1] = x end
          end
        end
        deps = {}
      elseif policy ~= 'c' then
        local reason = 'node ' .. n .. ' ' .. status
        if err and err ~= '' then reason = reason .. ': ' .. err end
        wf_abort(wf, base, now, ttl, 'failed', reason)
        return
      end
    end
    if spawn and #spawn > 0 then
      -- the plan's dependents wait for its children too: one more open parent per child, added
      -- before the plan's own count-down below
      local kids = {}
      for _, c in ipairs(spawn) do
        kids[#kids + 1] = c.n
        redis.call('HSET', wf, 't:' .. c.n, c.t, 's:' .. c.n, 'blocked', 'p:' .. c.n, 0,
          'd:' .. c.n, h[6] or '', 'f:' .. c.n, policy, 'a:' .. c.n, c.a, 'par:' .. c.n, n)
        wf_task(base, wf, c.n, c.t, h[7], now, c.m, c.p, h[8])
      end
      local all = kids[1]
      for i = 2, #kids do all = all .. ' ' .. kids[i] end
      redis.call('HSET', wf, 'c:' .. n, all, 'nodes', redis.call('HGET', wf, 'nodes') .. ' ' .. all)
      open = redis.call('HINCRBY', wf, 'open', #kids)
      for _, d in ipairs(deps) do redis.call('HINCRBY', wf, 'p:' .. d, #kids) end
      for _, c in ipairs(kids) do wf_ready(wf, base, c) end
    end
    for _, d in ipairs(deps) do
      if redis.call('HGET', wf, 's:' .. d) == 'blocked' and redis.call('HINCRBY', wf, 'p:' .. d, -1) <= 0 then
        wf_ready(wf, base, d)
      end
    end
    if tonumber(open) <= 0 then wf_close(wf, 'succeeded', now, ttl) end
  end
  return {final = wf_final, abort = wf_abort, ready = wf_ready, task = wf_task}
end
