-- Put an id this worker moved into its in-flight list back on pending, unrun: an id taken while
-- the worker was stopping, an orphan of a fetch whose reply was lost, or what a drain leaves.
-- KEYS[1] task hash, KEYS[2] this worker's in-flight list, KEYS[3] pending list, KEYS[4] active zset
-- ARGV[1] id, ARGV[2] worker id, ARGV[3] run token, or '' for any run of this worker (an orphan
-- whose fetch reply was lost, so its token never reached the worker)
-- Returns 'queued' when given back, 'dropped' for a copy that was not this worker's to give back
-- (finished, cancelled, or another run's), 'absent' when the id was not in the list (nothing done).
local id = ARGV[1]
if redis.call('LREM', KEYS[2], -1, id) == 0 then return 'absent' end
local t = redis.call('HMGET', KEYS[1], 'status', 'worker', 'token', 'attempts')
local status = t[1]
if not status then
  -- no record: fetch dead-letters it as poison
  redis.call('RPUSH', KEYS[3], id)
  return 'queued'
end
if status == 'queued' or status == 'retrying' then
  redis.call('RPUSH', KEYS[3], id)
  return 'queued'
end
if status ~= 'running' or t[2] ~= ARGV[2] or (ARGV[3] ~= '' and t[3] ~= ARGV[3]) then
  return 'dropped'
end
-- this worker's run, never started on the LLM: the attempt is not counted
local attempts = tonumber(t[4]) or 0
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'token')
redis.call('ZREM', KEYS[4], id)
redis.call('RPUSH', KEYS[3], id)
return 'queued'
