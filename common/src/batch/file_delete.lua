-- Deletes a file, unless a live batch still reads it (the api first removes the users that
-- ended). Its bytes go back to the files' total (files_bytes, another slot: the api does that
-- with the value returned, once, since only the call that deleted the hash gets it).
-- KEYS[1] file hash, KEYS[2] its lines, KEYS[3] its users set
-- ARGV[1] '1' to delete even with users (an upload that never finished has none)
-- Returns {'ok', bytes charged}, {'missing'} or {'in_use'}.
if ARGV[1] ~= '1' and redis.call('SCARD', KEYS[3]) > 0 then return {'in_use'} end
local charged = redis.call('HGET', KEYS[1], 'charged')
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
if existed == 0 then return {'missing'} end
return {'ok', tostring(tonumber(charged) or 0)}
