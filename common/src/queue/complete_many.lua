-- Record many runs' results in one call (the worker's completion batcher, complete_batch.rs).
-- Every item is fenced on its own (fence.lua, as complete.lua does): a stale, cancelled or
-- already reported item is refused alone and writes nothing, and the others of the group land.
-- Two kinds of item:
--   'p' a plain result (no agent memory, no workflow node, no stream batch left unanswered: the
--       drain's every task): complete.lua's steps, except that the group's ids leave `active` with
--       one ZREM and each tenant's run count goes down by one HINCRBY at the end, instead of one
--       of each per item (same state after the call: the script is atomic).
--   'f' anything else: complete.lua itself, wrapped as `complete_one(KEYS, ARGV)` (complete_batch.rs
--       concatenates it inside a function, so its KEYS and ARGV are the item's own).
-- KEYS[1] the worker's in-flight list, KEYS[2] active zset, KEYS[3] the queue's `running` hash,
-- then per item, in order: its task hash and, for an 'f' item that appends to an agent's memory,
-- that list.
-- ARGV[1] number of items, ARGV[2] now ms, ARGV[3] result TTL seconds; then per item:
--   'p', id, token, result JSON, call usage ("prompt|completion|cached|cost" or ''), the answer's
--       text not on the event stream yet, the run's step number;
--   'f', '1' when it has a memory key (else '0'), n, then n arguments exactly as complete.lua's ARGV.
-- Returns one answer per item, in order: complete.lua's verdict, or '!' and the error of an item
-- whose steps failed (its writes up to the error stay, as with a failed complete.lua call; the
-- worker resends that item, and its fence answers the resend).
local inflight, active, running = KEYS[1], KEYS[2], KEYS[3]
-- both kept as the strings the worker sent: a Lua number argument to redis.call is formatted anew
-- on every call (~0.3 µs for a TTL, ~0.7 for a time in ms, on the path of every task); ev_final's
-- arithmetic on ttl takes the string as Lua coerces it
local now, ttl = ARGV[2], ARGV[3]
-- plain items that ended their run: ids to take off `active`, runs per tenant to count off
local ended, by_tenant = {}, {}

local function plain(tkey, id, token, result, call_usage, rest, step)
  local t = redis.call('HMGET', tkey, 'status', 'token', 'reported', 'usage', 'attempts', 'wf', 'tenant', 'batch', 'ev')
  local refused = fence(tkey, inflight, id, token, t[1], t[2], t[3])
  if refused then return refused end
  ended[#ended + 1] = id
  local tenant = t[7]
  if not tenant or tenant == '' then tenant = 'default' end
  by_tenant[tenant] = (by_tenant[tenant] or 0) + 1
  -- the answering call's usage, added to the task's as complete.lua does
  local usage = usage_after(t[4], call_usage)
  if usage ~= '' then
    redis.call('HSET', tkey, 'status', 'succeeded', 'result', result, 'finished_at', now,
      'reported', token .. '|ok', 'usage', usage)
  else
    redis.call('HSET', tkey, 'status', 'succeeded', 'result', result, 'finished_at', now,
      'reported', token .. '|ok')
    usage = t[4]
  end
  redis.call('HDEL', tkey, 'error', 'token')
  redis.call('EXPIRE', tkey, ttl)
  ev_final(tkey, 'succeeded', ttl, nil, usage, rest, t[5], step, t[6] ~= false, t[8], t[9])
  return 'ok'
end

local function failed(e)
  if type(e) == 'table' then return '!' .. tostring(e.err or 'error') end
  return '!' .. tostring(e)
end

local out = {}
local k = 4
local a = 4
for i = 1, tonumber(ARGV[1]) do
  if ARGV[a] == 'p' then
    local ok, v = pcall(plain, KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
      ARGV[a + 5], ARGV[a + 6])
    out[i] = ok and v or failed(v)
    k = k + 1
    a = a + 7
  else
    local keys = {KEYS[k], inflight, active, running}
    k = k + 1
    if ARGV[a + 1] == '1' then
      keys[5] = KEYS[k]
      k = k + 1
    end
    local n = tonumber(ARGV[a + 2])
    local argv
    if n <= 64 then
      argv = {unpack(ARGV, a + 3, a + 2 + n)}
    else
      -- a long memory append: unpack is bounded by Lua's C stack
      argv = {}
      for j = 1, n do argv[j] = ARGV[a + 2 + j] end
    end
    local ok, v = pcall(complete_one, keys, argv)
    out[i] = ok and v or failed(v)
    a = a + 3 + n
  end
end
-- the plain items' runs end here (fair.lua's fq_ended, once per tenant for the group)
if #ended > 0 then
  redis.call('ZREM', active, unpack(ended))
  for tenant, n in pairs(by_tenant) do
    if redis.call('HINCRBY', running, tenant, -n) < 0 then
      redis.call('HSET', running, tenant, 0)
    end
  end
end
return out
