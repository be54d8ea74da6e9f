-- The files' byte total and each file's share of it, kept together in one slot so they can never
-- disagree: the file's own hash lives in its own slot (`file:{<id>}`), so a charge written there
-- and on the total could be split by a crash (in cluster mode the two writes go to two nodes).
-- KEYS[1] the total (STRING, files:bytes), KEYS[2] the charges (HASH file id -> bytes, in the
-- total's slot)
-- ARGV[1] file id, ARGV[2] bytes to charge, or 'release', ARGV[3] (release) the bytes the file's
-- deletion reported, used only when the file has no entry (a file charged before the ledger)
-- Returns the total after the change. A release is idempotent: a second one finds no entry and,
-- since only the call that deleted the file reports its bytes, nothing to take.
if ARGV[2] == 'release' then
  local n = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
  if n then
    redis.call('HDEL', KEYS[2], ARGV[1])
  else
    n = tonumber(ARGV[3]) or 0
  end
  if n ~= 0 then return redis.call('DECRBY', KEYS[1], n) end
  return tonumber(redis.call('GET', KEYS[1])) or 0
end
redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[2])
return redis.call('INCRBY', KEYS[1], ARGV[2])
