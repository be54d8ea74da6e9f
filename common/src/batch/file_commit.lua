-- An upload (or a batch's output file) is complete: the hash becomes the file object. Only if
-- it is still the upload in progress: a loop that took it for abandoned has deleted it.
-- KEYS[1] file hash
-- ARGV: field, value pairs to set (status processed among them)
-- Returns 1 when committed, 0 when the upload is gone.
if redis.call('HGET', KEYS[1], 'status') ~= 'uploading' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
