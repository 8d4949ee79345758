-- Which commands the broker's scripts run (and XREAD, SCAN) that this user may not
-- run on a topic's keys, checked without running them (Redis 7's ACL check; before
-- 7 nothing is told, and a refusal shows at the first publish). The start-up probe:
-- see redis_checks.
-- KEYS[1] a log stream, KEYS[2] a meta hash (of a topic no one can name).
if not redis.acl_check_cmd then return {} end
local log, meta = KEYS[1], KEYS[2]
local uses = {
  {'XADD', log, '*', 'f', 'v'}, {'XTRIM', log, 'MAXLEN', '0'}, {'XRANGE', log, '-', '+'},
  {'XREVRANGE', log, '+', '-'}, {'XLEN', log}, {'XINFO', 'STREAM', log},
  {'XSETID', log, '0-1'}, {'DEL', log}, {'EXISTS', log}, {'PERSIST', log},
  {'PEXPIRE', log, '1'}, {'PTTL', log}, {'HSET', meta, 'f', 'v'}, {'HGET', meta, 'f'},
  {'HMGET', meta, 'f'}, {'HDEL', meta, 'f'}, {'ZADD', meta, '1', 'm'},
  {'ZRANGEBYSCORE', meta, '-inf', '+inf'}, {'ZREM', meta, 'm'}, {'ZSCORE', meta, 'm'},
  {'TIME'}, {'XREAD', 'STREAMS', log, '0'}, {'SCAN', '0'},  -- (the last two: sent directly)
}
local refused = {}
for _, command in ipairs(uses) do
  if not redis.acl_check_cmd(unpack(command)) then refused[#refused + 1] = command[1] end
end
return refused
