-- Record many runs' results in one call (the worker's completion batcher, complete_batch.rs).
-- Each item is complete.lua itself, wrapped as `complete_one(KEYS, ARGV)` (complete_batch.rs
-- concatenates it inside a function, so its KEYS and ARGV are the item's own), with its own
-- fence: a stale, cancelled or already reported item is refused alone and writes nothing, and
-- the others of the group land. One call instead of one per result spares Redis the per-call
-- cost (the EVALSHA itself, its reply, the script's set-up) that dominated a drained task.
-- KEYS[1] the worker's in-flight list, KEYS[2] active zset, KEYS[3] the queue's `running` hash,
-- then per item, in order: its task hash and, when it appends to an agent's memory, that list.
-- ARGV[1] number of items; then per item: '1' when it has a memory key (else '0'), n = its
-- argument count, then its n arguments exactly as complete.lua's ARGV.
-- Returns one answer per item, in order: complete.lua's verdict, or '!' and the error of an item
-- whose body failed (its writes up to the error stay, as with a failed complete.lua call; the
-- worker retries that item, and its fence answers the resend).
local out = {}
local k = 4
local a = 2
for i = 1, tonumber(ARGV[1]) do
  local keys = {KEYS[k], KEYS[1], KEYS[2], KEYS[3]}
  k = k + 1
  if ARGV[a] == '1' then
    keys[5] = KEYS[k]
    k = k + 1
  end
  local n = tonumber(ARGV[a + 1])
  local argv
  if n <= 64 then
    argv = {unpack(ARGV, a + 2, a + 1 + n)}
  else
    -- a long memory append: unpack is bounded by Lua's C stack
    argv = {}
    for j = 1, n do argv[j] = ARGV[a + 1 + j] end
  end
  local ok, v = pcall(complete_one, keys, argv)
  a = a + 2 + n
  if ok then
    out[i] = v
  elseif type(v) == 'table' then
    out[i] = '!' .. tostring(v.err or 'error')
  else
    out[i] = '!' .. tostring(v)
  end
end
return out
