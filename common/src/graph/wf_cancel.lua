-- DELETE /v1/workflows/{id}: cancel every node not final and end the workflow `cancelled`.
-- KEYS[1] the workflow hash, then everything the workflow's end may reach (graph/wf.lua), declared
-- by the caller from its read of the workflow (queue/declare.rs)
-- ARGV[1] now ms, ARGV[2] result TTL seconds, ARGV[3] the workflow's `nodes` as the caller read
-- them
-- Returns 'ok', 'missing', the status the workflow already ended with, or, writing nothing,
-- 'reread' when its nodes are not the ones the caller read (a plan spawned children since).
local h = redis.call('HMGET', KEYS[1], 'status', 'base', 'nodes')
if not h[1] then return 'missing' end
if h[1] ~= 'running' then return h[1] end
if (h[3] or '') ~= ARGV[3] then return 'reread' end
wf().abort(KEYS[1], h[2], ARGV[1], tonumber(ARGV[2]), 'cancelled', 'cancelled by request')
return 'ok'
