-- Stops a batch's fan-out for good: a cancel (`POST /v1/batches/{id}/cancel`, status
-- `cancelling`) or the end of its completion window (status unchanged until it ends `expired`).
-- Lines not fanned out yet will never run: they count as failed now, in the same step as the
-- stop, so completed + failed reaches total exactly when every task that was made is final.
-- KEYS[1] batch hash
-- ARGV[1] 'cancelled' or 'expired', ARGV[2] now (Unix seconds)
-- Returns 'ok' when stopped now; else the batch's status ('missing' when there is none), and
-- for a batch already stopping, 'stopping'.
local b = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'total', 'ending')
if not b[1] then return 'missing' end
if b[4] then return 'stopping' end
if b[1] ~= 'validating' and b[1] ~= 'in_progress' then return b[1] end
local unsent = (tonumber(b[3]) or 0) - (tonumber(b[2]) or 0)
redis.call('HINCRBY', KEYS[1], 'failed', unsent)
redis.call('HSET', KEYS[1], 'ending', ARGV[1], 'unsent', unsent)
if ARGV[1] == 'cancelled' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[2])
end
return 'ok'
