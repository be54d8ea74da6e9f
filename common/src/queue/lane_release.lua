-- One agent's lane after one of its tasks became final (a worker's report, a cancel).
-- KEYS[1] the lane list, KEYS[2] pending list, KEYS[3] lanes set
-- ARGV[1] task key prefix (the queue's hash tag: the same slot), ARGV[2] the agent id
-- Returns 1 when the lane still holds a task, 0 when it is empty (and dropped from the set).
local left = lane_release(KEYS[1], KEYS[2], ARGV[1])
if left == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return left
