-- Event streams (docs/architecture.md, "Streaming"), prepended to every script that changes a
-- task's status (a Redis script cannot import another). A task's events are a STREAM beside its
-- record, '<task key>:events' (same hash tag, same slot); a workflow's are '<workflow key>:events'.
-- Each entry is one SSE event: field 'e' its name, field 'd' its JSON data. The scripts write
-- every status change in the same step as the change itself, so a stream can never say a task is
-- running after its result was written, and a run fenced out writes nothing here either.
-- The stream has no TTL while the task lives and gets the record's TTL when the task is final.
--
-- Streams on demand: a plain task's two entries (`started`, `final`) are written only once its
-- stream is on, the record's field 'ev' ('1'). It turns on when a client follows the task
-- (follow.lua, the api's first step of every subscription) or when the task writes any other
-- event (ev_on below: a retry, a recovery, a park, a give-back, a text delta, a tool step...).
-- Whatever turns it on first writes what the stream would have held: while 'ev' is unset
-- nothing was ever written, and the one entry that can have been skipped is the start of the
-- latest run (every other event turns the stream on), so ev_on writes that start from the
-- record, and follow.lua also the end of a task that is final already. A task nobody follows
-- thus costs Redis no stream at all (~15 us per task, loadtest/bench/README.md), and a follower,
-- however late, replays the same events it would have (entry ids aside: they are opaque).

-- Most entries a stream keeps ('~': Redis trims whole nodes, so a few more may stay). A long
-- agent's deltas are batched (one entry per ~50 ms), so this is far past a normal task.
-- A string: a Lua number argument is formatted into one on every call.
local EV_MAXLEN = '10000'

local function ev_add(key, kind, data)
  return redis.call('XADD', key, 'MAXLEN', '~', EV_MAXLEN, '*', 'e', kind, 'd', data)
end

-- The latest run's `started` entry, from the record (attempts, and runs = its token), when the
-- task has run; the attempt as it was when the run started (attempt: nil to read the record's).
local function ev_past_start(tkey, attempt)
  local r = redis.call('HMGET', tkey, 'attempts', 'runs')
  local a = attempt or r[1]
  if r[2] and tonumber(a) and tonumber(a) > 0 then
    ev_add(tkey .. ':events', 'started', '{"attempt":' .. a .. ',"run":' .. r[2] .. '}')
  end
end

-- Turns the task's stream on before an event other than a plain start or end is written (see
-- "Streams on demand" above). attempt: the attempt of the latest run when the caller changed the
-- record's `attempts` already (fail.lua gives an uncounted attempt back), else nil.
local function ev_on(tkey, attempt)
  if redis.call('HEXISTS', tkey, 'ev') == 0 then
    redis.call('HSET', tkey, 'ev', '1')
    ev_past_start(tkey, attempt)
  end
end

-- A status change of a workflow's node, as a 'node' event on the workflow's stream, only while
-- the workflow runs (a closed one's stream expires with it and must not be made anew). d: the
-- status data (a table; node and task_id are added).
local function ev_node(tkey, d)
  local w = redis.call('HMGET', tkey, 'wf', 'node')
  if w[1] and w[2] and redis.call('HGET', w[1], 'status') == 'running' then
    d.node = w[2]
    d.task_id = string.match(tkey, '.*:task:(.+)$')
    ev_add(w[1] .. ':events', 'node', cjson.encode(d))
  end
end

-- A task's status change: on its stream and on its workflow's. fields: more data (a table) or
-- nil; raw: a JSON member written as it is ('"name":<json>', for data cjson would not give back
-- as it came, e.g. empty arrays), or nil.
local function ev_status(tkey, status, fields, raw)
  local d = fields or {}
  d.status = status
  local json = cjson.encode(d)
  if raw then json = '{' .. raw .. ',' .. string.sub(json, 2) end
  ev_on(tkey)
  ev_add(tkey .. ':events', 'status', json)
  ev_node(tkey, d)
end

-- A run starts: one entry, 'started' {"attempt", "run"}, which the api sends as two events,
-- `status` (running, with the attempt) and `attempt_started` (one entry costs Redis less than
-- two on every task's path).
-- node: false when the caller knows the task is no workflow's node (no lookup then).
-- The JSON is built by hand on this path every task takes: cjson costs a table per event.
-- attempt and token: strings or numbers (fetch.lua passes the strings it wrote to the record).
-- on: the record's 'ev' field as the caller read it (written only when the stream is on).
local function ev_started(tkey, attempt, token, node, on)
  if on then
    ev_add(tkey .. ':events', 'started', '{"attempt":' .. attempt .. ',"run":' .. token .. '}')
  end
  if node ~= false then ev_node(tkey, {status = 'running', attempt = tonumber(attempt)}) end
end

-- A batch's request became final (docs/architecture.md, "Batch API"): every final transition
-- passes ev_final exactly once, so this is where the batch's request_counts move: succeeded counts
-- `completed`, failed and cancelled count `failed` (OpenAI's words), until the finalizer freezes
-- the counts (`frozen`). The record is kept past the batch's end (`keep_until` + the TTL), so the
-- finalizer still reads it when it writes the output file. A plain task pays one HGET, or nothing
-- when the caller read the record's `batch` field already (b: its value, false for none; nil: look
-- it up).
local function ev_batch(tkey, status, ttl, b)
  if b == nil then b = redis.call('HGET', tkey, 'batch') end
  if not b then return end
  local s = redis.call('HMGET', b, 'frozen', 'keep_until')
  if not s[2] then return end
  if not s[1] then
    redis.call('HINCRBY', b, status == 'succeeded' and 'completed' or 'failed', 1)
  end
  redis.call('EXPIREAT', tkey, tonumber(s[2]) + ttl, 'GT')
end

-- The 'final' entry itself (ev_final below, and follow.lua for a task nobody followed before it
-- ended), and the stream's TTL: the record's (ttl: seconds, or nil when the caller sets it).
local function ev_final_entry(tkey, status, ttl, err, usage, text, attempt, step)
  local json = '{"status":"' .. status .. '"'
  if status ~= 'succeeded' then json = json .. ',"error":' .. cjson.encode(err or status) end
  local p, c, cached, calls, cost = string.match(usage or '', '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
  if p then
    json = json .. ',"usage":{"prompt_tokens":' .. p .. ',"completion_tokens":' .. c ..
      ',"cached_tokens":' .. cached .. ',"calls":' .. calls .. ',"cost_usd":' ..
      string.format('%.9f', tonumber(cost) / 1e9) .. '}'
  end
  if text and text ~= '' then
    json = json .. ',"delta":{"text":' .. cjson.encode(text) .. ',"attempt":' .. (tonumber(attempt) or 0) ..
      ',"seq":' .. redis.call('HINCRBY', tkey, 'evseq', 1) .. ',"step":' .. (tonumber(step) or 0) .. '}'
  end
  local key = tkey .. ':events'
  ev_add(key, 'final', json .. '}')
  if ttl then redis.call('EXPIRE', key, ttl) end
end

-- A task became final: one entry, 'final' {"status", "error"?, "usage"?, "delta"?}, which the
-- api sends as the events it holds: the last `delta`, the `usage`, the `status`, then `done` (with
-- the result, read from the record) or `error`; and the stream expires with the record.
-- err: the error (not succeeded); usage: the task's usage field or nil; text: the answer's text
-- not written yet ('' or nil for none), of that attempt and step; node: false when the caller
-- knows the task is no workflow's node; batch: the record's `batch` field when the caller read it
-- (false: none), nil to look it up; on: the record's 'ev' field when the caller read it (false:
-- unset), nil to look it up. With the stream off nothing is written here: follow.lua writes the
-- end from the record if a client ever follows.
local function ev_final(tkey, status, ttl, err, usage, text, attempt, step, node, batch, on)
  ev_batch(tkey, status, ttl, batch)
  if on == nil then on = redis.call('HEXISTS', tkey, 'ev') == 1 end
  if on then
    ev_final_entry(tkey, status, ttl, err, usage, text, attempt, step)
  elseif status ~= 'succeeded' and err then
    -- the error the end would say, for follow.lua: not every path keeps it in `error` (a cancel
    -- says why only here); the rare paths pay this, a success nothing
    redis.call('HSET', tkey, 'everr', err)
  end
  if node ~= false then ev_node(tkey, {status = status}) end
end

-- A piece of a run's answer: {"text", "attempt", "seq", "step"}. seq counts the task's deltas
-- over every attempt (field 'evseq'), so a client may drop one it already has by seq alone.
local function ev_delta(tkey, text, attempt, step)
  ev_on(tkey)
  local seq = redis.call('HINCRBY', tkey, 'evseq', 1)
  ev_add(tkey .. ':events', 'delta',
    cjson.encode({text = text, attempt = tonumber(attempt) or 0, seq = seq, step = tonumber(step) or 0}))
end

-- The task's usage so far (its 'usage' field, "prompt|completion|cached|calls|cost nano-dollars").
local function ev_usage(tkey, usage)
  local p, c, cached, calls, cost = string.match(usage or '', '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
  if not p then return end
  ev_on(tkey)
  ev_add(tkey .. ':events', 'usage', '{"prompt_tokens":' .. p .. ',"completion_tokens":' .. c ..
    ',"cached_tokens":' .. cached .. ',"calls":' .. calls .. ',"cost_usd":' ..
    string.format('%.9f', tonumber(cost) / 1e9) .. '}')
end
