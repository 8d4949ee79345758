-- A page of a topic's log, read in one step with what the log knows of itself, so
-- a reader paging through it can tell whether retention trimmed entries between
-- its position and the page (a replay slower than retention), or whether the log
-- was recreated under it (another epoch).
-- KEYS[1] log stream, KEYS[2] meta hash; ARGV[1] XRANGE start, ARGV[2] count.
-- Returns {epoch|false, trimmed|false, entries}.
local log, meta = KEYS[1], KEYS[2]
if redis.call('EXISTS', log) == 0 then
  return {false, false, {}}
end
return {
  redis.call('HGET', meta, 'epoch') or false,
  redis.call('HGET', meta, 'trimmed') or false,
  redis.call('XRANGE', log, ARGV[1], '+', 'COUNT', ARGV[2]),
}
