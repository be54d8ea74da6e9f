-- Record a run's result, once, and only if that run still owns the task.
-- KEYS[1] task hash, KEYS[2] worker in-flight list, KEYS[3] active zset, KEYS[4] the queue's
-- `running` hash (runs in flight per tenant, fair.lua), KEYS[5] agent memory list (optional)
-- ARGV[1] id, ARGV[2] run token, ARGV[3] now ms, ARGV[4] result JSON, ARGV[5] result TTL seconds,
-- ARGV[6] memory length cap, ARGV[7] memory TTL seconds, ARGV[8] the run's call usage to add to the
-- task's counters ("prompt|completion|cached|cost nano-dollars", or ''), ARGV[9] '1' when the task
-- is a workflow node (else ''), ARGV[10] its output, ARGV[11] a plan's children (JSON, see
-- wf_final in wf.lua) or '', ARGV[12] the answer's text not yet on the task's event stream (the
-- worker batches deltas; the rest goes with the result, so the stream's deltas of the winning
-- attempt add up to the result), ARGV[13] the run's step number, ARGV[14] the number of a batch
-- of this run whose write got no answer, or '', ARGV[15] that batch's text (written here only if
-- it did not land: see emit.lua's 'evbatch'), ARGV[16..] messages to append to memory
-- Returns 'ok'; or, writing nothing: the verdict this run already got (a resend after a lost reply),
-- the final status ('succeeded', 'failed', 'cancelled'), 'missing', or 'stale' (another run owns it).
local token = ARGV[2]
local t = redis.call('HMGET', KEYS[1], 'status', 'token', 'reported', 'usage', 'attempts', 'evbatch', 'wf', 'tenant', 'batch', 'ev')
local refused = fence(KEYS[1], KEYS[2], ARGV[1], token, t[1], t[2], t[3])
if refused then return refused end
redis.call('ZREM', KEYS[3], ARGV[1])
-- the fence saw this run's token on the record, and the HDEL below removes it: the run ends here
fq_ended(KEYS[4], t[8])
-- the answering call's usage, in the same step as the result (a refused write adds nothing here:
-- the worker adds it with usage.lua, since the call was paid for); see usage_after (fence.lua)
local usage = usage_after(t[4], ARGV[8])
if usage ~= '' then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'result', ARGV[4], 'finished_at', ARGV[3],
    'reported', token .. '|ok', 'usage', usage)
else
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'result', ARGV[4], 'finished_at', ARGV[3],
    'reported', token .. '|ok')
end
redis.call('HDEL', KEYS[1], 'error', 'token')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
local rest = ARGV[12] or ''
if ARGV[14] and ARGV[14] ~= '' then
  local last_token, last_batch = string.match(t[6] or '', '^(%d+)|(%d+)$')
  if not (last_token == token and tonumber(last_batch) >= tonumber(ARGV[14])) then
    rest = ARGV[15] .. rest
  end
end
-- one entry: the last text, the usage, the status and the end (the api sends them as events)
if usage == '' then usage = t[4] end
-- the batch and ev fields read above spare ev_final its own lookups
ev_final(KEYS[1], 'succeeded', tonumber(ARGV[5]), nil, usage, rest, t[5], ARGV[13], t[7] ~= false, t[9], t[10])
if #KEYS == 5 and #ARGV > 15 then
  for i = 16, #ARGV do
    redis.call('RPUSH', KEYS[5], ARGV[i])
  end
  redis.call('LTRIM', KEYS[5], -tonumber(ARGV[6]), -1)
  -- the trim may have cut a tool-call group: results whose call was trimmed away go too, so the
  -- stored history starts at a whole exchange (messages are JSON with `role` first)
  while true do
    local head = redis.call('LINDEX', KEYS[5], 0)
    if head and string.sub(head, 1, 15) == '{"role":"tool",' then
      redis.call('LPOP', KEYS[5])
    else
      break
    end
  end
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[7]))
end
-- a workflow's node: its dependents may run now (same step as the result, so no crash between)
if ARGV[9] == '1' then
  local spawn = nil
  if ARGV[11] ~= '' then spawn = cjson.decode(ARGV[11]) end
  wf().final(KEYS[1], 'succeeded', ARGV[10], nil, tonumber(ARGV[3]), spawn)
end
return 'ok'
