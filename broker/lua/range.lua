-- A page of a topic's log, read in one step with what the log knows of itself, so
-- a reader paging through it can tell whether retention trimmed entries between
-- its position and the page (a replay slower than retention), or whether the log
-- was recreated under it (another epoch), or whether its position is an entry the
-- log no longer holds though retention did not remove it (a lost tail: the events
-- after it, appended since, follow events the reader never got).
-- A page holds at most ARGV[4] bytes of field values (0: no bound), and at least one
-- entry: a client that stops reading pins one page in the broker, so a page of 500
-- events of 60 KB (30 MB, twice over) must not be one.
-- KEYS[1] log stream, KEYS[2] meta hash; ARGV[1] XRANGE start, ARGV[2] count,
-- ARGV[3] the reader's position ('' for none: from the origin), ARGV[4] most bytes.
-- Returns {epoch|false, trimmed|false, entries, 1 if the position is an entry else 0,
--          1 if the page was cut short by its bytes else 0, the places at or after
--          the position where the log lost events (state.lua), oldest first}.
-- A deleted topic (its marker lingers for live readers) reads as no log at all.
local log, meta = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', meta, 'epoch', 'trimmed', 'deleted', 'lost_after')
if redis.call('EXISTS', log) == 0 or fields[3] then
  return {false, false, {}, 0, 0, {}}
end
local found = 0
if ARGV[3] ~= '' and redis.call('XRANGE', log, ARGV[3], ARGV[3])[1] then
  found = 1
end
local entries = redis.call('XRANGE', log, ARGV[1], '+', 'COUNT', ARGV[2])
local most, bytes, cut = tonumber(ARGV[4]), 0, 0
if most > 0 then
  for i, entry in ipairs(entries) do
    for _, value in ipairs(entry[2]) do
      bytes = bytes + #value
    end
    if bytes > most and i > 1 then
      for j = #entries, i, -1 do
        entries[j] = nil
      end
      cut = 1
      break
    end
  end
end
-- The places where the log lost events (state.lua) that this reader has yet to pass.
local losses = {}
if fields[4] then
  local at_ms, at_seq = string.match(ARGV[3] ~= '' and ARGV[3] or '0-0', '(%d+)-(%d+)')
  at_ms, at_seq = tonumber(at_ms), tonumber(at_seq)
  for id in string.gmatch(fields[4], '%S+') do
    local ms, seq = string.match(id, '(%d+)-(%d+)')
    ms, seq = tonumber(ms), tonumber(seq)
    if ms > at_ms or (ms == at_ms and seq >= at_seq) then
      losses[#losses + 1] = id
    end
  end
end
return {fields[1] or false, fields[2] or false, entries, found, cut, losses}
