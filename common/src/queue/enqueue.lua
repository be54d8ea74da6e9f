-- Write a task record and queue its id, atomically; with an idempotency key, at most once.
-- KEYS[1] task hash, KEYS[2] pending list, KEYS[3] idempotency key (optional)
-- ARGV[1] id, ARGV[2] queue, ARGV[3] created_at ms, ARGV[4] max_attempts, ARGV[5] payload JSON,
-- ARGV[6] idempotency TTL seconds
-- Returns {1, id} when enqueued, {0, existing_id} when the idempotency key was already used.
if #KEYS == 3 then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    return {0, existing}
  end
end
redis.call('HSET', KEYS[1],
  'queue', ARGV[2], 'status', 'queued', 'attempts', 0, 'rate_limited', 0,
  'max_attempts', ARGV[4], 'payload', ARGV[5], 'created_at', ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[1])
if #KEYS == 3 then
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[6])
end
return {1, ARGV[1]}
