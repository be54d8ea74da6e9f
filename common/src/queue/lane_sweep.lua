-- The backstop for lanes: every final path that does not move its lane on itself (a tool
-- timeout, a task buried at fetch, a worker lost between its report and the release) is caught
-- here within a few passes. The api runs it every second over part of the lanes set.
-- KEYS[1] lanes set, KEYS[2] pending list
-- ARGV[1] lane key prefix, ARGV[2] task key prefix, ARGV[3] SSCAN cursor, ARGV[4] SSCAN count
-- Lane keys are ARGV[1] .. agent: the queue's hash tag, so the same slot as KEYS.
-- Returns the next cursor ('0' when the pass is over).
local scan = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', tonumber(ARGV[4]))
for _, agent in ipairs(scan[2]) do
  if lane_release(ARGV[1] .. agent, KEYS[2], ARGV[2]) == 0 then
    redis.call('SREM', KEYS[1], agent)
  end
end
return scan[1]
