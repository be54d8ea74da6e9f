-- Fair scheduling across tenants (docs/architecture.md, "Fair scheduling"), prepended to every
-- script that puts an id into a queue's pending work, takes one out (other than fetch.lua, which
-- makes the fair choice itself) or ends a run (a Redis script cannot import another).
-- A queue's pending work is one LIST per tenant, '<base>pending:<tenant>' (LPUSH = the back,
-- RPUSH = the head, taken from the right: FIFO within the tenant, as `pending` was before), plus:
--   '<base>pending'  LIST of tickets ('~', never a task id: ids are '<queue>.<uuid>'), one per id
--                    in any tenant's list, so its LLEN is the queue's total pending work (what KEDA
--                    and GET /v1/queues read) and a worker's BLMOVE wakes when work arrives;
--   '<base>ring'     LIST of the tenants whose list is not empty, each once, in turn order (head
--                    at the left);
--   '<base>turns'    HASH tenant -> turns taken in its current visit at the ring's head (weights
--                    above 1 only);
--   '<base>running'  HASH tenant -> the tenant's runs in flight in this queue (max_running);
--   '<base>tenants'  HASH of the tenants' admission settings (w:/p:/r:<tenant>), written by the
--                    api (Broker::set_admission).
-- base is '<prefix>:{<queue>}:' (all in the queue's slot). A record without a `tenant` field (or
-- with '') belongs to the default tenant.
-- The library: fq_base, fq_ended and fq_push, small and on the path of every task, and fair(),
-- returning the table of the rest, built only where a script needs it (a function defined at a
-- script's top level costs every call of the script a closure).

-- The base of a queue's keys from its pending (tickets) key: '<base>pending'.
local function fq_base(pending)
  return string.sub(pending, 1, -8)
end

-- A run of the tenant's ended (its token was removed from the record in the same step): one run
-- less in flight. A count never goes below 0 (a run started before the counts existed).
local function fq_ended(running, tenant)
  if not tenant or tenant == '' then tenant = 'default' end
  if redis.call('HINCRBY', running, tenant, -1) < 0 then
    redis.call('HSET', running, tenant, 0)
  end
end

-- Queues an id in its tenant's line: at the head (a give-back, a recovered run, a parked task
-- whose turn came, tool outputs) or at the back (new work, a retry). A tenant whose line was
-- empty joins the ring at its end; the ticket keeps LLEN pending equal to the ids queued.
-- tenant: the record's `tenant` field (nil or '' for the default tenant).
local function fq_push(base, tenant, id, head)
  if not tenant or tenant == '' then tenant = 'default' end
  local list = base .. 'pending:' .. tenant
  local n
  if head then
    n = redis.call('RPUSH', list, id)
  else
    n = redis.call('LPUSH', list, id)
  end
  if n == 1 then redis.call('RPUSH', base .. 'ring', tenant) end
  redis.call('LPUSH', base .. 'pending', '~')
end

local function fair()
  local TICKET = '~'

  local function name(tenant)
    if not tenant or tenant == '' then return 'default' end
    return tenant
  end

  -- fq_push() for a task whose tenant is on its record.
  local function push_task(base, tkey, id, head)
    fq_push(base, redis.call('HGET', tkey, 'tenant'), id, head)
  end

  -- Takes every copy of an id out of its tenant's line, with one ticket each; a line left empty
  -- leaves the ring. Returns how many copies there were.
  local function remove(base, tenant, id)
    tenant = name(tenant)
    local list = base .. 'pending:' .. tenant
    local k = redis.call('LREM', list, 0, id)
    if k > 0 then
      redis.call('LPOP', base .. 'pending', k)
      if redis.call('LLEN', list) == 0 then
        redis.call('LREM', base .. 'ring', 1, tenant)
        redis.call('HDEL', base .. 'turns', tenant)
      end
    end
    return k
  end

  -- Ends a run on a path that cannot be sure there is one (cancel, recovery, give-back): the
  -- token's HDEL answers 1 only when it existed, so a run is counted off exactly once.
  local function end_run(base, tkey, tenant)
    if redis.call('HDEL', tkey, 'token') == 1 then
      fq_ended(base .. 'running', tenant)
    end
  end

  -- A ticket found where an id was expected (a worker's in-flight list, after its blocking wait
  -- moved it there): back to pending, where it came from.
  local function ticket_back(base)
    redis.call('RPUSH', base .. 'pending', TICKET)
  end

  return {push_task = push_task, remove = remove, end_run = end_run,
    ticket_back = ticket_back, TICKET = TICKET}
end
