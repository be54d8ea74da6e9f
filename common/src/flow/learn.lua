-- What an upstream said about its limits, for the whole fleet: block the model until a reset (a
-- 429, or a reply saying nothing is left), and remember a limit lower than the configured one.
-- KEYS[1] model scope hash
-- ARGV[1] blocked until (ms since the epoch, 0: no block), ARGV[2] learned rpm (0: none),
-- ARGV[3] learned tpm (0: none), ARGV[4] state TTL ms (0: none), ARGV[5] 1 when the scope has
-- no configured rpm/tpm of its own
-- A limit learned for a scope with no window yet starts it empty, not seeded full as a lost
-- configured window is: the reply that taught it says where the upstream stands (a 429 blocks,
-- a reply that got through had room), so there is no unknown minute to assume used up.
-- Returns the block now in force (ms since the epoch, 0 for none).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = tonumber(ARGV[1])
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0
if until_ms > blocked then
  redis.call('HSET', KEYS[1], 'blocked_until', until_ms)
  blocked = until_ms
end
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if (rpm > 0 or tpm > 0) and ARGV[5] == '1' and redis.call('HEXISTS', KEYS[1], 'head') == 0 then
  redis.call('HSET', KEYS[1], 'head', math.floor(now / 1000) - 60, 'rsum', 0, 'tsum', 0)
end
if rpm > 0 then redis.call('HSET', KEYS[1], 'learned_rpm', rpm, 'learned_at', now) end
if tpm > 0 then redis.call('HSET', KEYS[1], 'learned_tpm', tpm, 'learned_at', now) end
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
if blocked > now then return blocked end
return 0
