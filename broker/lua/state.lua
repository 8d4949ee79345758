-- Read what a subscriber needs to judge a cursor, in one atomic step; first apply
-- retention by age, so a topic nobody publishes to any more still forgets its old
-- events (appends apply it otherwise). A closed topic keeps its end.
-- KEYS[1] log stream, KEYS[2] meta hash; ARGV[1] max age in ms (0: none).
-- A live reader back after an outage also gives ARGV[2], the epoch of the log it read,
-- ARGV[3], the newest id it read, and ARGV[4], that entry's number in the log ('' when
-- not known): if that log no longer holds that entry, and
-- retention did not remove it, the log lost events (an asynchronous failover, an
-- AOF's lost second). The loss is recorded here, in the same step (`lost_after`: the
-- newest entry kept before it), so that a client that was away before the lost
-- events is told where they were (range.lua), even when the log was appended to
-- since and is no shorter than what the reader read. A log keeps the places of its
-- last MAX_LOSSES losses, oldest first, apart by spaces.
-- Returns {epoch|false, trimmed|false, length, first id|false, last id|false,
--          end id|false, ms to expiry (-1: kept), epoch of a deleted log|false,
--          its marker's id|false, where a loss was recorded now|false, the number of
--          the newest entry it issued (append.lua)|false, the logs deleted before that
--          one, "epoch:marker" apart by spaces, the newest first|false, when there is
--          no log: Redis's time (ms), which an origin cursor carries|false}.
-- A deleted topic (its marker lingers for live readers) reads as no log, but says
-- which epoch was deleted: a cursor of it gets a "deleted" gap, not "unknown"; and
-- where its marker is: a cursor at it was told already (answered 204). A log
-- created since (published again right after the DELETE) says the same of the
-- last log deleted before it.
local log, meta = KEYS[1], KEYS[2]
local MAX_LOSSES = 32

local function before(a, b)  -- stream ids "ms-seq", compared as numbers
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms < b_ms or (a_ms == b_ms and tonumber(a_seq) < tonumber(b_seq))
end

local fields = redis.call('HMGET', meta, 'epoch', 'trimmed', 'closed', 'deleted', 'deleted_epoch', 'deleted_at', 'n', 'deleted_before')
if redis.call('EXISTS', log) == 0 or fields[4] then
  local before = fields[8] or false
  if fields[4] and fields[5] and fields[6] then  -- deleted again: the one before goes first
    before = fields[5] .. ':' .. fields[6] .. (before and (' ' .. before) or '')
  end
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  return {false, false, 0, false, false, false, -1, fields[4] and fields[1] or false, fields[4] or false, false, false, before, now_ms}
end
local trimmed = fields[2]
local max_age_ms = tonumber(ARGV[1])
if max_age_ms > 0 then
  local now = redis.call('TIME')
  local cutoff = string.format('%d-0', math.floor(tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000 - max_age_ms))
  if fields[3] and before(fields[3], cutoff) then
    cutoff = fields[3]  -- never past the end entry: it says the topic is over
  end
  local older = redis.call('XREVRANGE', log, '(' .. cutoff, '-', 'COUNT', 1)
  if older[1] then
    redis.call('XTRIM', log, 'MINID', cutoff)
    redis.call('HSET', meta, 'trimmed', older[1][1])
    trimmed = older[1][1]
  end
end
local lost_after = false
local read_through = ARGV[3]
if read_through and fields[1] == ARGV[2] and before(trimmed or '0-0', read_through)
    and not redis.call('XRANGE', log, read_through, read_through)[1] then
  local kept = redis.call('XREVRANGE', log, read_through, '-', 'COUNT', 1)
  lost_after = kept[1] and kept[1][1] or (trimmed or '0-0')
  local places = {lost_after}
  for id in string.gmatch(redis.call('HGET', meta, 'lost_after') or '', '%S+') do
    if id ~= lost_after then places[#places + 1] = id end
  end
  table.sort(places, before)
  while #places > MAX_LOSSES do table.remove(places, 1) end
  redis.call('HSET', meta, 'lost_after', table.concat(places, ' '))
  -- Numbers the reader read must never be issued again either: another instance's
  -- reader that was past the primary change before these entries were written never
  -- read them, and would take the next entry for the one after what it read, passing
  -- the loss in silence. Numbered on past them, that entry does not follow: that
  -- reader looks again (fanout.py), and its subscribers are told here (range.lua).
  local read_number = tonumber(ARGV[4] or '')
  if read_number and read_number > (tonumber(fields[7]) or 0) then
    redis.call('HSET', meta, 'n', read_number)
    fields[7] = tostring(read_number)
  end
  -- Ids the reader read must never be issued again: a primary whose clock is behind
  -- the lost entries would give new events their ids, and a client back with one
  -- would resume after it as if it were the same event, passing the rest in silence.
  local info = redis.pcall('XINFO', 'STREAM', log)  -- (an error: a table with no items)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' and before(info[i + 1], read_through) then
      redis.pcall('XSETID', log, read_through)  -- (refused past a deletion: then no harm)
    end
  end
end
local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
return {
  fields[1] or false,
  trimmed or false,
  redis.call('XLEN', log),
  first[1] and first[1][1] or false,
  last[1] and last[1][1] or false,
  fields[3] or false,
  redis.call('PTTL', log),
  fields[5] or false,
  fields[6] or false,
  lost_after,
  fields[7] or false,
  fields[8] or false,
  false,
}
