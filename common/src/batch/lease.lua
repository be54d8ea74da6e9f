-- A batch's lease: the api replica holding it drives the batch (fan-out, cancel pages,
-- finalization). One key, so it is one slot wherever it lives.
-- KEYS[1] the lease
-- ARGV[1] 'take', 'renew' or 'release', ARGV[2] the holder's token, ARGV[3] lease time (ms)
-- Returns 1 when the caller holds (take, renew) or held (release) it, else 0.
if ARGV[1] == 'take' then
  if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', tonumber(ARGV[3])) then return 1 end
  return 0
end
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
else
  redis.call('DEL', KEYS[1])
end
return 1
