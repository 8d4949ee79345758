-- Read what a subscriber needs to judge a cursor, in one atomic step.
-- KEYS[1] log stream, KEYS[2] meta hash.
-- Returns {epoch|false, trimmed|false, length, first id|false, last id|false}.
local log, meta = KEYS[1], KEYS[2]
if redis.call('EXISTS', log) == 0 then
  return {false, false, 0, false, false}
end
local epoch = redis.call('HGET', meta, 'epoch')
local trimmed = redis.call('HGET', meta, 'trimmed')
local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
return {
  epoch or false,
  trimmed or false,
  redis.call('XLEN', log),
  first[1] and first[1][1] or false,
  last[1] and last[1][1] or false,
}
