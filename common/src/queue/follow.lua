-- A client follows a task (the api's first step of every `GET /v1/tasks/{id}/events` and of a
-- streamed chat completion): turns the task's stream on (events.lua, "Streams on demand") and,
-- the first time, writes the entries nobody wrote while it was off. That is at most the latest
-- run's `started` and, for a task that is final already, its `final` entry rebuilt from the
-- record: the answer's text is `result.content` (while the stream was off no delta was written,
-- so the whole text would have gone with the result), with the task's usage and the error its end
-- gave (`everr`, written by ev_final while the stream was off). One atomic
-- step: every event after it is written by its own script (the stream is on), and every one before
-- it is covered here, so a follower never misses or repeats one.
-- KEYS[1] task hash, KEYS[2] its event stream (events.lua)
-- Returns 0 when the record is gone, else 1.
local t = redis.call('HMGET', KEYS[1], 'status', 'ev', 'result', 'everr', 'usage', 'attempts', 'steps', 'error')
if not t[1] then return 0 end
if t[2] then return 1 end
redis.call('HSET', KEYS[1], 'ev', '1')
ev_past_start(KEYS[1])
local status = t[1]
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  local text = nil
  if status == 'succeeded' and t[3] then
    local ok, r = pcall(cjson.decode, t[3])
    if ok and type(r) == 'table' and type(r.content) == 'string' then text = r.content end
  end
  ev_final_entry(KEYS[1], status, nil, t[4] or t[8], t[5], text, t[6], t[7])
  -- the stream expires with the record (TTL -1: none yet, e.g. a batch's task kept for its batch)
  local ttl = redis.call('TTL', KEYS[1])
  if ttl >= 0 then redis.call('EXPIRE', KEYS[1] .. ':events', math.max(ttl, 1)) end
end
return 1
