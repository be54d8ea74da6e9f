//! Test helpers for a queue's pending work as fair scheduling keeps it
//! (`common/src/queue/fair.lua`): one line per tenant (`<base>pending:<tenant>`), a ring of the
//! tenants with work, `pending` holding one ticket (`~`) per queued id, and the per-tenant run
//! counts. Tests read and change pending work through these, never with raw list commands on
//! `pending` (which holds tickets, not ids).

use anyhow::Result;

/// The queue's own library, so the helpers push and remove exactly as the scripts do.
const FAIR_LUA: &str = include_str!("../../common/src/queue/fair.lua");

/// The base of the default queue's keys under the default prefix.
pub const BASE: &str = "agentq:{default}:";

/// Every id waiting in the queue's pending work, each tenant's line in the order it is taken
/// (head first), tenants by key name; ids left in `pending` itself (pushed there raw, as
/// before tickets existed: fetch still starts them) first. `KEYS` is fine: a private test Redis.
const PENDING_IDS_LUA: &str = r#"
local base = ARGV[1]
local out = {}
local raw = redis.call('LRANGE', base .. 'pending', 0, -1)
for i = #raw, 1, -1 do
  if raw[i] ~= '~' then out[#out + 1] = raw[i] end
end
local lines = redis.call('KEYS', base .. 'pending:*')
table.sort(lines)
for _, k in ipairs(lines) do
  local ids = redis.call('LRANGE', k, 0, -1)
  for i = #ids, 1, -1 do out[#out + 1] = ids[i] end
end
return out
"#;

/// The invariants of fair scheduling, as a Lua function `fair_violations(base, settled)` returning a list
/// of strings (empty when they hold). Atomic when run inside one script (the chaos test appends
/// it to its snapshot script):
/// - LLEN of the tenants' lines, summed, is at most the tickets in `pending` plus the tickets a
///   blocking wait moved into an in-flight list and no fetch spent yet (no queued id without a
///   ticket to wake a worker for it); with `settled` (nothing running, no worker between its wait
///   and its fetch) the two are equal. Only the first can hold at every instant: a cancel that
///   removes an id whose ticket a blocking wait already moved cannot reach that worker's list, so
///   that ticket outlives its id until a fetch finds no line behind it and drops it;
/// - the ring holds each tenant whose line is not empty, once, and no other;
/// - `running[t]` equals the number of the queue's task records of tenant `t` (no `tenant` field:
///   `default`) whose status is `running`.
pub const FAIR_CHECK_LUA: &str = r#"
local function fair_violations(base, settled)
  local out = {}
  local tickets, legacy = 0, 0
  for _, e in ipairs(redis.call('LRANGE', base .. 'pending', 0, -1)) do
    if e == '~' then tickets = tickets + 1 else legacy = legacy + 1 end
  end
  local moved = 0
  for _, k in ipairs(redis.call('KEYS', base .. 'inflight:*')) do
    for _, e in ipairs(redis.call('LRANGE', k, 0, -1)) do
      if e == '~' then moved = moved + 1 end
    end
  end
  local queued, with_work = 0, {}
  for _, k in ipairs(redis.call('KEYS', base .. 'pending:*')) do
    local n = redis.call('LLEN', k)
    queued = queued + n
    if n > 0 then with_work[string.sub(k, #base + 9)] = true end
  end
  if queued > tickets + moved or (settled and queued ~= tickets + moved) then
    out[#out + 1] = 'the tenants\' lines hold ' .. queued .. ' ids but there are ' .. tickets ..
      ' tickets in pending and ' .. moved .. ' in in-flight lists'
  end
  local seen = {}
  for _, t in ipairs(redis.call('LRANGE', base .. 'ring', 0, -1)) do
    if seen[t] then out[#out + 1] = 'tenant ' .. t .. ' is in the ring twice' end
    seen[t] = true
    if not with_work[t] then out[#out + 1] = 'tenant ' .. t .. ' is in the ring with an empty line' end
  end
  for t in pairs(with_work) do
    if not seen[t] then out[#out + 1] = 'tenant ' .. t .. ' has queued ids but is not in the ring' end
  end
  local running = {}
  for _, k in ipairs(redis.call('KEYS', base .. 'task:*')) do
    if string.sub(k, -7) ~= ':events' then
      local r = redis.call('HMGET', k, 'status', 'tenant')
      if r[1] == 'running' then
        local t = r[2]
        if not t or t == '' then t = 'default' end
        running[t] = (running[t] or 0) + 1
      end
    end
  end
  local counted = redis.call('HGETALL', base .. 'running')
  local count = {}
  for i = 1, #counted, 2 do count[counted[i]] = tonumber(counted[i + 1]) end
  for t, n in pairs(running) do
    if (count[t] or 0) ~= n then
      out[#out + 1] = 'tenant ' .. t .. ' has ' .. n .. ' running tasks but running counts ' .. (count[t] or 0)
    end
  end
  for t, n in pairs(count) do
    if n ~= 0 and not running[t] then
      out[#out + 1] = 'tenant ' .. t .. ' has no running task but running counts ' .. n
    end
  end
  return out
end
"#;

/// The ids waiting in the default queue's pending work (see [`PENDING_IDS_LUA`]).
pub fn pending_ids(c: &mut redis::Connection) -> Result<Vec<String>> {
    Ok(redis::Script::new(PENDING_IDS_LUA).arg(BASE).invoke(c)?)
}

/// Queues an id at the back of its tenant's line (its record's `tenant`, default without one),
/// with its ticket, exactly as the scripts do; a second push of the same id makes a duplicate.
pub fn push_pending(c: &mut redis::Connection, id: &str) -> Result<()> {
    let lua = format!(
        "{FAIR_LUA}\nfq_push(ARGV[1], redis.call('HGET', ARGV[1] .. 'task:' .. ARGV[2], 'tenant'), ARGV[2], false)"
    );
    redis::Script::new(&lua).arg(BASE).arg(id).invoke::<()>(c)?;
    Ok(())
}

/// Takes every copy of an id out of its tenant's line with their tickets, as `cancel.lua` does;
/// returns how many there were.
pub fn remove_pending(c: &mut redis::Connection, id: &str) -> Result<i64> {
    let lua = format!(
        "{FAIR_LUA}\nreturn fair().remove(ARGV[1], redis.call('HGET', ARGV[1] .. 'task:' .. ARGV[2], 'tenant'), ARGV[2])"
    );
    Ok(redis::Script::new(&lua).arg(BASE).arg(id).invoke(c)?)
}

/// The violations of [`FAIR_CHECK_LUA`] in the default queue now (empty when it holds), checked
/// as settled (tickets equal to the queued ids) or as at any instant.
pub fn fair_violations(c: &mut redis::Connection, settled: bool) -> Result<Vec<String>> {
    let lua = format!("{FAIR_CHECK_LUA}\nreturn fair_violations(ARGV[1], ARGV[2] == '1')");
    Ok(redis::Script::new(&lua)
        .arg(BASE)
        .arg(if settled { "1" } else { "0" })
        .invoke(c)?)
}
