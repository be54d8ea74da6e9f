-- One agent's lane after one of its tasks became final (a worker's report, a cancel), or the
-- api's lane sweep passing by (the backstop for final paths that do not move their lane on: a
-- tool timeout, a task buried at fetch, a worker lost between its report and the release).
-- KEYS[1] the lane list, KEYS[2] pending list, KEYS[3] lanes set, then what the walk reaches,
-- declared by the caller from its read of the lane (queue/declare.rs): each id's record and its
-- tenant's line (named from the queue's base and the record), and the ring
-- ARGV[1] the agent id, ARGV[2..] the lane's first entries as the caller read them
-- Returns lane_release()'s answer (lane.lua); 0 also drops the agent from the lanes set.
local ids = {}
for i = 2, #ARGV do ids[i - 1] = ARGV[i] end
local left = lane_release(KEYS[1], KEYS[2], ids)
if left == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
return left
