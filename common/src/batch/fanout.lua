-- Fans a chunk of a batch's input lines out as tasks, at most once (docs/architecture.md,
-- "Batch API"). The batch's `cursor` says how many lines are out; a chunk is written only when it
-- starts there and the batch still fans out, so two api replicas (the POST's own fan-out and the
-- loop resuming it after a crash, or two loops) never enqueue a line twice or skip one.
-- KEYS[1] batch hash, KEYS[2] its task list, KEYS[3] the queue's pending list (tickets; each task
-- goes to the back of its tenant's line, fair.lua is prepended), KEYS[4..] the chunk's task hashes
-- (new keys, one per line, in order), then the batch's tenant's line (the caller read the
-- batch's tenant) and the ring
-- Every task belongs to the batch's tenant (its `tenant` field, none for the default tenant).
-- ARGV[1] the cursor the chunk starts at, ARGV[2] now ms, ARGV[3] now (Unix seconds), ARGV[4]
-- the result TTL (seconds), then 6 values per line: task id, custom_id, max_attempts, payload JSON
-- ('' when the line no longer validates: then its task is written failed), error message, error
-- (`<status>|<OpenAI error body>`, for the error file)
-- Returns {'ok', cursor after}, or writing nothing {'moved' | 'stopped' | 'missing', cursor}.
local b = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'ending', 'keep_until', 'queue', 'total', 'tenant')
if not b[1] then return {'missing', 0} end
local cursor = tonumber(b[2]) or 0
if b[3] or (b[1] ~= 'validating' and b[1] ~= 'in_progress') then return {'stopped', cursor} end
if cursor ~= tonumber(ARGV[1]) then return {'moved', cursor} end
local n = (#ARGV - 4) / 6
if cursor + n > (tonumber(b[6]) or 0) then return {'moved', cursor} end
local keep = tonumber(b[4]) + tonumber(ARGV[4])
local base = fq_base(KEYS[3])
local tenant = b[7]
if tenant == '' then tenant = false end
for i = 1, n do
  local o = 4 + (i - 1) * 6
  local id, payload = ARGV[o + 1], ARGV[o + 4]
  local tkey = KEYS[3 + i]
  if payload ~= '' then
    redis.call('HSET', tkey, 'queue', b[5], 'status', 'queued',
      'max_attempts', ARGV[o + 3], 'payload', payload, 'created_at', ARGV[2], 'batch', KEYS[1],
      'custom_id', ARGV[o + 2])
    if tenant then redis.call('HSET', tkey, 'tenant', tenant) end
    fq_push(base, tenant, id, false)
  else
    -- final from the start: counted here, as ev_final would count it
    redis.call('HSET', tkey, 'queue', b[5], 'status', 'failed',
      'max_attempts', ARGV[o + 3], 'created_at', ARGV[2], 'finished_at', ARGV[2], 'batch', KEYS[1],
      'custom_id', ARGV[o + 2], 'error', ARGV[o + 5], 'batch_error', ARGV[o + 6])
    if tenant then redis.call('HSET', tkey, 'tenant', tenant) end
    redis.call('EXPIREAT', tkey, keep)
    redis.call('HINCRBY', KEYS[1], 'failed', 1)
  end
  redis.call('RPUSH', KEYS[2], id)
end
cursor = cursor + n
redis.call('HSET', KEYS[1], 'cursor', cursor)
if b[1] == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[3])
end
return {'ok', cursor}
