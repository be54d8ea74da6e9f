-- Prepended to step.lua and suspend.lua (see steps.rs): one call's usage added to a task's
-- `usage` field ("prompt|completion|cached|calls|cost", cost in nano-dollars).
-- add_usage(current field or false, the call's "prompt|completion|cached|cost" or '') returns the
-- new field, or nil when the call reported no usage.
local function add_usage(current, call)
  local p, c, cached, cost = string.match(call, '^(%d+)|(%d+)|(%d+)|(%d+)$')
  if not p then return nil end
  local add = {tonumber(p), tonumber(c), tonumber(cached), 1, tonumber(cost)}
  local i = 0
  for v in string.gmatch(current or '', '%d+') do
    i = i + 1
    if add[i] then add[i] = add[i] + tonumber(v) end
  end
  return table.concat(add, '|')
end
