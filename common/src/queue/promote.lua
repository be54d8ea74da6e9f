-- Move due work back to pending: retries whose backoff is over (to the back, behind work that was
-- waiting), and tasks the flow limiter parked whose turn has come (to the head: they were taken
-- once already, and their turn is now).
-- Each goes to its tenant's line (fair.lua is prepended): the back or the head of that line.
-- KEYS[1] delayed zset, KEYS[2] pending list (tickets), KEYS[3] throttled zset, then what the
-- moves reach, declared by the caller (queue/declare.rs): each id's record and its tenant's line
-- (named from the queue's base and the record's tenant), and the ring
-- ARGV[1] now ms, ARGV[2] how many of the ids that follow are from delayed (the rest are from
-- throttled), ARGV[3..] the ids the caller found due. One another promotion moved already, or
-- that is due later now, is left alone.
-- Returns {how many moved, when the next entry of either set is due (ms), or -1 when both are
-- empty}: the workers sleep until then, so each parked task reaches pending at its turn rather
-- than with every turn of a polling period at once.
local base = fq_base(KEYS[2])
local now = tonumber(ARGV[1])
local from_delayed = tonumber(ARGV[2])
local F = fair()
local moved = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local set, head = KEYS[1], false
  if i > 2 + from_delayed then set, head = KEYS[3], true end
  local at = redis.call('ZSCORE', set, id)
  if at and tonumber(at) <= now then
    redis.call('ZREM', set, id)
    F.push_task(base, base .. 'task:' .. id, id, head)
    moved = moved + 1
  end
end
local next_ms = -1
for _, k in ipairs({KEYS[1], KEYS[3]}) do
  local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = math.floor(tonumber(first[2]))
    if next_ms < 0 or at < next_ms then next_ms = at end
  end
end
return {moved, next_ms}
