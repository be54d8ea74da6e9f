-- Event streams (docs/architecture.md, "Streaming"), prepended to every script that changes a
-- task's status (a Redis script cannot import another). A task's events are a STREAM beside its
-- record, '<task key>:events' (same hash tag, same slot); a workflow's are '<workflow key>:events'.
-- Each entry is one SSE event: field 'e' its name, field 'd' its JSON data. The scripts write
-- every status change in the same step as the change itself, so a stream can never say a task is
-- running after its result was written, and a run fenced out writes nothing here either.
-- The stream has no TTL while the task lives and gets the record's TTL when the task is final.

-- Most entries a stream keeps ('~': Redis trims whole nodes, so a few more may stay). A long
-- agent's deltas are batched (one entry per ~50 ms), so this is far past a normal task.
local EV_MAXLEN = 10000

local function ev_add(key, kind, data)
  return redis.call('XADD', key, 'MAXLEN', '~', EV_MAXLEN, '*', 'e', kind, 'd', data)
end

-- A task's status change: on its stream and, for a workflow's node, as a 'node' event on the
-- workflow's stream. fields: more data (a table) or nil; raw: a JSON member written as it is
-- ('"name":<json>', for data cjson would not give back as it came, e.g. empty arrays), or nil.
local function ev_status(tkey, status, fields, raw)
  local d = fields or {}
  d.status = status
  local json = cjson.encode(d)
  if raw then json = '{' .. raw .. ',' .. string.sub(json, 2) end
  ev_add(tkey .. ':events', 'status', json)
  local w = redis.call('HMGET', tkey, 'wf', 'node')
  -- only while the workflow runs: a closed one's stream expires with it and must not be made anew
  if w[1] and w[2] and redis.call('HGET', w[1], 'status') == 'running' then
    d.node = w[2]
    d.task_id = string.match(tkey, '.*:task:(.+)$')
    ev_add(w[1] .. ':events', 'node', cjson.encode(d))
  end
end

-- A task became final: its status, then the terminal event ('done' with the result, or 'error'),
-- and the stream expires with the record. result: the result JSON (succeeded) or nil.
local function ev_final(tkey, status, ttl, err, result)
  ev_status(tkey, status)
  local key = tkey .. ':events'
  if result then
    ev_add(key, 'done', '{"status":"succeeded","result":' .. result .. '}')
  else
    ev_add(key, 'error', cjson.encode({status = status, error = err or status}))
  end
  redis.call('EXPIRE', key, ttl)
end

-- A piece of a run's answer: {"text", "attempt", "seq", "step"}. seq counts the task's deltas
-- over every attempt (field 'evseq'), so a client may drop one it already has by seq alone.
local function ev_delta(tkey, text, attempt, step)
  local seq = redis.call('HINCRBY', tkey, 'evseq', 1)
  ev_add(tkey .. ':events', 'delta',
    cjson.encode({text = text, attempt = tonumber(attempt) or 0, seq = seq, step = tonumber(step) or 0}))
end

-- The task's usage so far (its 'usage' field, "prompt|completion|cached|calls|cost nano-dollars").
local function ev_usage(tkey, usage)
  local p, c, cached, calls, cost = string.match(usage or '', '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
  if not p then return end
  ev_add(tkey .. ':events', 'usage', '{"prompt_tokens":' .. p .. ',"completion_tokens":' .. c ..
    ',"cached_tokens":' .. cached .. ',"calls":' .. calls .. ',"cost_usd":' ..
    string.format('%.9f', tonumber(cost) / 1e9) .. '}')
end
