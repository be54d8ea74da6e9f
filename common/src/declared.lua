-- Prepended, in a debug build (every test), to each script made with script::declared (see
-- script.rs): every key the script touches must be one of its KEYS. Redis Cluster routes a
-- script by its KEYS alone, and a proxy or a server that enforces declarations (Dragonfly, some
-- managed offerings) refuses a key it was not given; a plain Redis runs it anyway, so without
-- this check an undeclared key would only show up there. A local `redis` shadows the global one
-- for the rest of the script: its call and pcall check the command's key arguments first, then
-- run the command. A release build runs the script without it.
local redis = (function(real)
  local declared = {}
  for _, k in ipairs(KEYS) do declared[k] = true end
  -- the commands agentq's scripts use whose key is not their first argument (or that have none)
  local ALL, NONE = {DEL = true, EXISTS = true}, {TIME = true, PUBLISH = true}
  local function check(k)
    if not declared[k] then
      error({err = 'ERR undeclared key ' .. tostring(k) .. ' (every key a script touches must be in KEYS)'})
    end
  end
  local function keys_of(cmd, ...)
    local c = string.upper(cmd)
    if NONE[c] then return end
    if ALL[c] then
      for i = 1, select('#', ...) do check((select(i, ...))) end
      return
    end
    check((select(1, ...)))
    if c == 'LMOVE' or c == 'RPOPLPUSH' or c == 'BLMOVE' then check((select(2, ...))) end
  end
  -- everything else (sha1hex, error_reply, log...) is the real table's
  return setmetatable({
    call = function(cmd, ...)
      keys_of(cmd, ...)
      return real.call(cmd, ...)
    end,
    pcall = function(cmd, ...)
      keys_of(cmd, ...)
      return real.pcall(cmd, ...)
    end,
  }, {__index = real})
end)(redis)
