-- The two fenced steps of a batch's finalization (docs/architecture.md, "Batch API"); between
-- them the api writes the output and error files. Only the holder of the batch's lease
-- (KEYS[2] = ARGV[2]) moves anything, so one replica finalizes; a dead finalizer's lease expires
-- and the next one redoes the files from the start (the file ids stay, their lines are rewritten).
-- KEYS[1] batch hash, KEYS[2] its lease, KEYS[3] its task list
-- ARGV[1] 'begin' or 'end', ARGV[2] lease token, ARGV[3] now (Unix seconds)
-- begin: ARGV[4], ARGV[5] ids for the output and error files (kept from a first begin)
--   -> {'ok', output file id, error file id, ending ('' | 'cancelled' | 'expired')} once every
--      request is final: the counts are frozen (`frozen`) and the status `finalizing` (a stopped
--      batch keeps `cancelling`)
-- end: ARGV[4] / ARGV[5] '1' when the output / error file has lines, ARGV[6] the result TTL
--   -> {'ok', final status}: completed, cancelled or expired; the record and its task list
--      expire after the TTL
-- Or, moving nothing: {'lease'} (not the holder), {'missing'}, {'open'} (requests not final),
-- {'ended', status}.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {'lease'} end
local b = redis.call('HMGET', KEYS[1], 'status', 'total', 'completed', 'failed', 'ending',
  'out_file', 'err_file', 'frozen')
local status = b[1]
if not status then return {'missing'} end
if status == 'completed' or status == 'failed' or status == 'expired' or status == 'cancelled' then
  return {'ended', status}
end
if ARGV[1] == 'begin' then
  if (tonumber(b[3]) or 0) + (tonumber(b[4]) or 0) < (tonumber(b[2]) or 0) then return {'open'} end
  redis.call('HSET', KEYS[1], 'frozen', 1)
  if status == 'validating' or status == 'in_progress' then
    redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[3])
  end
  local out, err = b[6], b[7]
  if not out then
    out, err = ARGV[4], ARGV[5]
    redis.call('HSET', KEYS[1], 'out_file', out, 'err_file', err)
  end
  return {'ok', out, err, b[5] or ''}
end
if not b[8] then return {'open'} end
local final = b[5] or 'completed'
redis.call('HSET', KEYS[1], 'status', final, final .. '_at', ARGV[3])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'output_file_id', b[6]) end
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'error_file_id', b[7]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
redis.call('DEL', KEYS[2])
return {'ok', final}
