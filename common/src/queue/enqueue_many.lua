-- A group of tasks of one queue in one call (fair.lua and enqueue_item.lua are prepended): the
-- items of POST /v1/tasks/batch, or concurrent POST /v1/tasks gathered by the api's group
-- commit. Each item is enqueue_item()'s step, in order, decided on its own (idempotency key
-- already used, tenant at max_pending); the script as a whole is one atomic step.
-- KEYS[1] pending list (tickets), KEYS[2] the lanes set, then per item in order: its task hash,
-- its idempotency key (only when it has one), its agent's lane list (only when it has an agent);
-- then the line of each tenant the items name, the ring, `tenants` and `recent` (enqueue_item.lua
-- reaches them from the queue's base)
-- ARGV[1] queue, ARGV[2] created_at ms, ARGV[3] idempotency TTL seconds, ARGV[4] the usual
-- max_attempts, ARGV[5] the usual tenant ('' for the default tenant), ARGV[6] one character per
-- item: '0' when it has the usual max_attempts and tenant, no idempotency key and no agent, else
-- '1'; then per item: its id and its payload JSON, and for a '1' item 4 more: max_attempts, '1'
-- when it has an idempotency key, the agent key ('' for none), the tenant.
-- Every argument costs Redis a Lua string (hashed, interned) per call, about 0.25 µs here, so
-- the common item carries 2, not 6, and its flag is one byte of a string read with string.byte.
-- Returns {codes, values...}: codes has one character per item, in order, enqueue_item()'s
-- code ('1' enqueued, '0' idempotency key already used, '2' over max_pending); values hold,
-- in order, the existing id or the pending count of each item whose code is not '1' (an
-- enqueued item's id is its own).
local g = enqueue_group(fq_base(KEYS[1]))
local codes = {}
local out = {''}
local k = 3
local flags = ARGV[6]
local j = 0
local i = 7
local n = #ARGV
while i <= n do
  local id, payload = ARGV[i], ARGV[i + 1]
  local max_attempts, idem, agent, tenant = ARGV[4], nil, '', ARGV[5]
  local tkey = KEYS[k]
  k = k + 1
  j = j + 1
  if string.byte(flags, j) == 48 then -- '0'
    i = i + 2
  else
    max_attempts, agent, tenant = ARGV[i + 2], ARGV[i + 4], ARGV[i + 5]
    if ARGV[i + 3] == '1' then
      idem = KEYS[k]
      k = k + 1
    end
    i = i + 6
  end
  local lane
  if agent ~= '' then
    lane = KEYS[k]
    k = k + 1
  end
  local code, value = enqueue_item(g, tkey, idem, lane, KEYS[2], id, ARGV[1], ARGV[2],
    max_attempts, payload, ARGV[3], agent, tenant)
  codes[#codes + 1] = code
  if code ~= 1 then out[#out + 1] = value end
end
enqueue_flush(g)
out[1] = table.concat(codes)
return out
