-- A page of a topic's log, read in one step with what the log knows of itself, so
-- a reader paging through it can tell whether retention trimmed entries between
-- its position and the page (a replay slower than retention), or whether the log
-- was recreated under it (another epoch).
-- KEYS[1] log stream, KEYS[2] meta hash; ARGV[1] XRANGE start, ARGV[2] count.
-- Returns {epoch|false, trimmed|false, entries}.
-- A deleted topic (its marker lingers for live readers) reads as no log at all.
local log, meta = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', meta, 'epoch', 'trimmed', 'deleted')
if redis.call('EXISTS', log) == 0 or fields[3] then
  return {false, false, {}}
end
return {
  fields[1] or false,
  fields[2] or false,
  redis.call('XRANGE', log, ARGV[1], '+', 'COUNT', ARGV[2]),
}
