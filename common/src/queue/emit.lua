-- Appends a run's events to its task's stream (events.lua is prepended): batched answer text
-- ('delta') and its agent steps ('tool_call', 'tool_result', 'attempt_started' before a fallback
-- model's call). Only while that run owns the task: a run fenced out (a stale owner) never adds
-- a delta a client would mix into the winning attempt's text.
-- KEYS[1] task hash, KEYS[2] its event stream (events.lua)
-- ARGV[1] run token, ARGV[2] the run's batch number (1, 2, ...), ARGV[3] the run's step number,
-- ARGV[4..] pairs: event name, data ('delta': the text itself; others: JSON)
-- A batch is written once: a resend after a lost reply (same token, a batch number not above the
-- last written) writes nothing, so the stream never holds a piece of text twice.
-- Returns 'ok'; or, writing nothing, 'missing', 'stale' (another run owns the task, or none).
local t = redis.call('HMGET', KEYS[1], 'status', 'token', 'evbatch', 'attempts')
if not t[1] then return 'missing' end
if t[1] ~= 'running' or t[2] ~= ARGV[1] then return 'stale' end
local batch = tonumber(ARGV[2])
local last_token, last_batch = string.match(t[3] or '', '^(%d+)|(%d+)$')
if last_token == ARGV[1] and tonumber(last_batch) >= batch then return 'ok' end
redis.call('HSET', KEYS[1], 'evbatch', ARGV[1] .. '|' .. batch)
for i = 4, #ARGV - 1, 2 do
  if ARGV[i] == 'delta' then
    ev_delta(KEYS[1], ARGV[i + 1], t[4], ARGV[3])
  else
    ev_on(KEYS[1])
    ev_add(KEYS[1] .. ':events', ARGV[i], ARGV[i + 1])
  end
end
return 'ok'
