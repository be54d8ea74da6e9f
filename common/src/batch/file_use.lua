-- A batch takes a file as its input: the file must be stored (not being uploaded) and of the
-- right purpose; the batch joins the file's users, so the file is not deleted under it.
-- KEYS[1] file hash, KEYS[2] its users set
-- ARGV[1] the batch id, ARGV[2] the purpose required
-- Returns {'ok', lines}, {'missing'}, or {'purpose', the file's purpose}.
local f = redis.call('HMGET', KEYS[1], 'status', 'purpose', 'lines')
if f[1] ~= 'processed' then return {'missing'} end
if f[2] ~= ARGV[2] then return {'purpose', f[2]} end
redis.call('SADD', KEYS[2], ARGV[1])
return {'ok', tostring(tonumber(f[3]) or 0)}
