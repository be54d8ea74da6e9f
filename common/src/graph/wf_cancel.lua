-- DELETE /v1/workflows/{id}: cancel every node not final and end the workflow `cancelled`.
-- KEYS[1] the workflow hash
-- ARGV[1] now ms, ARGV[2] result TTL seconds
-- Returns 'ok', 'missing', or the status the workflow already ended with.
local h = redis.call('HMGET', KEYS[1], 'status', 'base')
if not h[1] then return 'missing' end
if h[1] ~= 'running' then return h[1] end
wf().abort(KEYS[1], h[2], ARGV[1], tonumber(ARGV[2]), 'cancelled', 'cancelled by request')
return 'ok'
