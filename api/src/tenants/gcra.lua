-- A tenant's enqueue rate (GCRA: the generic cell rate algorithm): fair at every edge, one key.
-- KEYS[1] the tenant's theoretical arrival time (microseconds)
-- ARGV[1] now (microseconds), ARGV[2] the emission interval (1 / rate, microseconds),
-- ARGV[3] the burst (submissions allowed at once), ARGV[4] how many submissions this is (a
-- POST /v1/tasks/batch counts each task; absent: 1; never more than the burst, the caller checks)
-- Returns 0 when the submissions are admitted (and counted), else the microseconds until they
-- would be; a refusal writes nothing.
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4] or '1')
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - burst * interval
if allow_at > now then return math.ceil(allow_at - now) end
-- kept only while it still constrains: once now passes it, an absent key means the same
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
