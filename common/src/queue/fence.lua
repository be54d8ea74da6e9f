-- Prepended to complete.lua and fail.lua (see mod.rs): the run-ownership check every report makes.
-- fence(...) returns nil when the run still owns the task and its id was removed from that
-- worker's in-flight list: the caller may write. Otherwise it returns the answer to give without
-- writing anything: the verdict this run already got (`reported` names its token: a resend after a
-- lost reply), the final status, 'missing', or 'stale' (the run was fenced out; `fenced` += 1).
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
    if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
    redis.call('HINCRBY', tkey, 'fenced', 1)
    return 'stale'
  end
  -- -1: search from the tail, where the oldest ids (the ones finishing now) sit; LMOVE adds at the head
  if redis.call('LREM', inflight, -1, id) == 0 then
    -- the token matches but the id is not in this worker's list: not this run's to write
    redis.call('HINCRBY', tkey, 'fenced', 1)
    return 'stale'
  end
  return nil
end
