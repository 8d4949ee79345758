-- A page of a topic's log, read in one step with what the log knows of itself, so
-- a reader paging through it can tell whether retention trimmed entries between
-- its position and the page (a replay slower than retention), or whether the log
-- was recreated under it (another epoch), or whether its position is an entry the
-- log no longer holds though retention did not remove it (a lost tail: the events
-- after it, appended since, follow events the reader never got).
-- KEYS[1] log stream, KEYS[2] meta hash; ARGV[1] XRANGE start, ARGV[2] count,
-- ARGV[3] the reader's position ('' for none: from the origin).
-- Returns {epoch|false, trimmed|false, entries, 1 if the position is an entry else 0}.
-- A deleted topic (its marker lingers for live readers) reads as no log at all.
local log, meta = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', meta, 'epoch', 'trimmed', 'deleted')
if redis.call('EXISTS', log) == 0 or fields[3] then
  return {false, false, {}, 0}
end
local found = 0
if ARGV[3] ~= '' and redis.call('XRANGE', log, ARGV[3], ARGV[3])[1] then
  found = 1
end
return {
  fields[1] or false,
  fields[2] or false,
  redis.call('XRANGE', log, ARGV[1], '+', 'COUNT', ARGV[2]),
  found,
}
