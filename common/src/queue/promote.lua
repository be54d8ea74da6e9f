-- Move due work back to pending: retries whose backoff is over (to the back, behind work that was
-- waiting), and tasks the flow limiter parked whose turn has come (to the head: they were taken
-- once already, and their turn is now).
-- Each goes to its tenant's line (fair.lua is prepended): the back or the head of that line.
-- KEYS[1] delayed zset, KEYS[2] pending list (tickets; the tenants' lines and task keys are built
-- from it: the same slot), KEYS[3] throttled zset
-- ARGV[1] now ms, ARGV[2] most ids to move from each set
-- Returns {how many moved, when the next entry of either set is due (ms), or -1 when both are
-- empty}: the workers sleep until then, so each parked task reaches pending at its turn rather
-- than with every turn of a polling period at once.
local base = fq_base(KEYS[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local F = (#due > 0) and fair()
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  F.push_task(base, base .. 'task:' .. id, id, false)
end
local turn = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #turn > 0 and not F then F = fair() end
for _, id in ipairs(turn) do
  redis.call('ZREM', KEYS[3], id)
  F.push_task(base, base .. 'task:' .. id, id, true)
end
local next_ms = -1
for _, k in ipairs({KEYS[1], KEYS[3]}) do
  local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = math.floor(tonumber(first[2]))
    if next_ms < 0 or at < next_ms then next_ms = at end
  end
end
return {#due + #turn, next_ms}
