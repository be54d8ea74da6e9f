-- Prepended to complete.lua and fail.lua (see mod.rs): the run-ownership check every report makes.
-- fence(...) returns nil when the run still owns the task and its id was removed from that
-- worker's in-flight list: the caller may write. Otherwise it returns the answer to give without
-- writing anything: the verdict this run already got (`reported` names its token: a resend after a
-- lost reply), the final status, 'missing', or 'stale' (the run was fenced out; `fenced` += 1).
-- A final task has no run left, so the reporting worker's copy of its id is dropped from that
-- worker's list with the final status: a cancel leaves the owner's list to its owner (the other
-- way to learn of it is the cancel message or the poll, and the worker drops its copy then).
local function fence(tkey, inflight, id, token, status, current, reported)
  if not status then
    redis.call('LREM', inflight, -1, id)
    return 'missing'
  end
  if current ~= token then
    local prefix = token .. '|'
    if reported and string.sub(reported, 1, #prefix) == prefix then
      return string.sub(reported, #prefix + 1)
    end
    if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
      redis.call('LREM', inflight, '-1', id)
      return status
    end
    redis.call('HINCRBY', tkey, 'fenced', 1)
    return 'stale'
  end
  -- -1: search from the tail, where the oldest ids (the ones finishing now) sit; LMOVE adds at the
  -- head. A string: every report passes here, and Lua formats a number argument on every call.
  if redis.call('LREM', inflight, '-1', id) == 0 then
    -- the token matches but the id is not in this worker's list: not this run's to write
    redis.call('HINCRBY', tkey, 'fenced', 1)
    return 'stale'
  end
  return nil
end

-- A success's usage field: the answering call's usage ("prompt|completion|cached|cost", '' or
-- nil when it reported none) added to the task's (`prev`, "prompt|completion|cached|calls|cost",
-- nil before its first answer); '' when there is nothing to write. One field, so a task's first
-- answer costs no extra command; that first field is built by concatenation (a table and gmatch
-- cost ~10 us a call here).
local function usage_after(prev, call_usage)
  local p, c, cached, cost = string.match(call_usage or '', '^(%d+)|(%d+)|(%d+)|(%d+)$')
  if not p then return '' end
  if not prev then
    return p .. '|' .. c .. '|' .. cached .. '|1|' .. cost
  end
  local add = {tonumber(p), tonumber(c), tonumber(cached), 1, tonumber(cost)}
  local i = 0
  for v in string.gmatch(prev, '%d+') do
    i = i + 1
    if add[i] then add[i] = add[i] + tonumber(v) end
  end
  return table.concat(add, '|')
end
