-- Records one step of a run that goes on (the model's reply asked for server-side tools and they
-- ran): the reply and the tools' results are appended to the task's transcript, with the call's
-- usage, only while the run still owns the task. A later run (after a crash, a retry) resumes
-- from here, so no recorded model call or tool call is made again.
-- KEYS[1] task hash, KEYS[2] its event stream (events.lua)
-- ARGV[1] run token, ARGV[2] the step's messages (JSON, one per line), ARGV[3] the call's usage
-- ("prompt|completion|cached|cost", or '')
-- Returns 'ok'; or, writing nothing, 'missing', the final status, or 'stale' (another run owns
-- the task now, or none does).
local t = redis.call('HMGET', KEYS[1], 'status', 'token', 'usage', 'transcript')
if not t[1] then return 'missing' end
if t[1] ~= 'running' or t[2] ~= ARGV[1] then
  if t[1] == 'succeeded' or t[1] == 'failed' or t[1] == 'cancelled' then return t[1] end
  return 'stale'
end
local usage = add_usage(t[3], ARGV[3])
if usage then
  redis.call('HSET', KEYS[1], 'usage', usage)
  ev_usage(KEYS[1], usage)
end
local transcript = ARGV[2]
if t[4] and t[4] ~= '' then transcript = t[4] .. '\n' .. ARGV[2] end
redis.call('HSET', KEYS[1], 'transcript', transcript)
redis.call('HINCRBY', KEYS[1], 'steps', 1)
return 'ok'
