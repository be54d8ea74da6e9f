-- Budget admission: hold a call's worst-case cost against every budget that applies, atomically,
-- or refuse it. All budget keys share the `{budgets}` hash tag (one cluster slot).
-- KEYS[1] budget config hash (scope -> "limit_n|window_s|mode"), then per candidate scope i:
--   KEYS[2i] spend hash (b:<bucket> -> settled nano-dollars, held -> sum of holds, h:<id> -> hold,
--   refused_until -> ms until which settled spend refuses calls of the last refused size),
--   KEYS[2i+1] holds zset (hold id -> expiry ms)
-- ARGV[1] now ms, ARGV[2] hold id, ARGV[3] worst-case cost (nano-dollars), ARGV[4] hold TTL ms,
-- ARGV[5..] the candidate scopes (common/src/flow/budget.rs `scopes_of`), in KEYS order.
-- Returns {1, scope, ...} held against the listed scopes (none: no budget applies);
-- {0, eligible_ms, scope, limit_n, spent_n, held_n, holds_only} refused by `scope` until about
-- eligible_ms (holds_only 1: the calls in flight are what is in the way, not settled spend);
-- {2, scope, limit_n} refused for good: the call alone costs more than the whole budget.
local now = tonumber(ARGV[1])
local id = ARGV[2]
local amount = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local nscopes = #ARGV - 4

-- Rolling windows keep 61 buckets of window/60 (the current one and 60 before it), so spend
-- counts for at least the whole window (never less: a budget never lets more than its limit
-- through in any window-long stretch). Calendar windows keep the one bucket of the period.
local function geometry(window_s, mode)
  if mode == 'calendar' then return window_s, 1 end
  return math.max(1, math.floor(window_s / 60)), 61
end

local budgets = {}
for i = 1, nscopes do
  local scope = ARGV[4 + i]
  local conf = redis.call('HGET', KEYS[1], scope)
  if conf then
    local limit, window_s, mode = string.match(conf, '^(%d+)|(%d+)|(%a+)$')
    if limit then
      local b = {scope = scope, spend = KEYS[2 * i], holds = KEYS[2 * i + 1],
                 limit = tonumber(limit), window_s = tonumber(window_s), mode = mode}
      b.size, b.keep = geometry(b.window_s, mode)
      b.cur = math.floor(now / 1000 / b.size)
      budgets[#budgets + 1] = b
    end
  end
end

for _, b in ipairs(budgets) do
  -- holds of workers that died mid-call expire: a crash cannot lock a budget for good
  local gone = redis.call('ZRANGEBYSCORE', b.holds, '-inf', now)
  for _, g in ipairs(gone) do
    local v = tonumber(redis.call('HGET', b.spend, 'h:' .. g))
    if v then
      redis.call('HINCRBY', b.spend, 'held', -v)
      redis.call('HDEL', b.spend, 'h:' .. g)
    end
    redis.call('ZREM', b.holds, g)
  end
  b.held = tonumber(redis.call('HGET', b.spend, 'held')) or 0
  b.spent = 0
  b.buckets = {}
  local flat = redis.call('HGETALL', b.spend)
  for j = 1, #flat, 2 do
    local idx = string.match(flat[j], '^b:(%d+)$')
    if idx then
      idx = tonumber(idx)
      if idx <= b.cur - b.keep then
        redis.call('HDEL', b.spend, flat[j])
      else
        local v = tonumber(flat[j + 1]) or 0
        b.spent = b.spent + v
        b.buckets[#b.buckets + 1] = {idx, v}
      end
    end
  end
end

for _, b in ipairs(budgets) do
  if amount > b.limit then
    return {2, b.scope, b.limit}
  end
  if b.spent + b.held + amount > b.limit then
    -- when enough settled spend leaves the window; if holds are what is in the way, they settle
    -- (or expire) soon: look again in a second
    local eligible = now + 500
    if b.spent + amount > b.limit and b.held + amount <= b.limit then
      table.sort(b.buckets, function(x, y) return x[1] < y[1] end)
      local left = b.spent
      for _, bk in ipairs(b.buckets) do
        left = left - bk[2]
        if left + b.held + amount <= b.limit then
          eligible = math.max(eligible, (bk[1] + b.keep) * b.size * 1000)
          break
        end
      end
    end
    -- 1 when the settled spend alone leaves room: only calls in flight are in the way, and
    -- what they really cost may leave enough once they settle
    local holds_only = 0
    if b.spent + amount <= b.limit then holds_only = 1 end
    if holds_only == 0 then
      -- settled spend refuses calls of this size until `eligible`: the api refuses the new
      -- work of a tenant whose quota says so until then (Budgets::refusing); a call that fits
      -- clears it
      redis.call('HSET', b.spend, 'refused_until', eligible)
    end
    return {0, eligible, b.scope, b.limit, b.spent, b.held, holds_only}
  end
end

local out = {1}
for _, b in ipairs(budgets) do
  redis.call('HDEL', b.spend, 'refused_until')
  redis.call('HSET', b.spend, 'h:' .. id, amount)
  redis.call('HINCRBY', b.spend, 'held', amount)
  redis.call('ZADD', b.holds, now + ttl, id)
  local life = (b.size * (b.keep + 1)) * 1000 + ttl
  redis.call('PEXPIRE', b.spend, life)
  redis.call('PEXPIRE', b.holds, life)
  out[#out + 1] = b.scope
end
return out
