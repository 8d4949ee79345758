-- A page of a topic's log, read in one step with what the log knows of itself, so
-- a reader paging through it can tell whether retention trimmed entries between
-- its position and the page (a replay slower than retention), or whether the log
-- was recreated under it (another epoch), or whether its position is an entry the
-- log no longer holds though retention did not remove it (a lost tail: the events
-- after it, appended since, follow events the reader never got).
-- A page holds at most ARGV[4] bytes of fields (names and values; 0: no bound), and
-- at least one entry: a client that stops reading pins one page in the broker, so a
-- page of 500 events of 60 KB (30 MB, twice over) must not be one.
-- It is read in steps sized to the bytes left, so that Redis reads about what the
-- page keeps: read at once (COUNT 500, then cut), a page of 8 events of 60 KB made
-- Redis read and copy into Lua all 500 (30 MB), and a replay of 500 such events 1.9 GB.
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
local count, most = tonumber(ARGV[2]), tonumber(ARGV[4])
local FIRST_STEP = 2 -- a page of one large event (at least one) reads two

local GROWTH = 8 -- a step asks for at most this many times the entries read so far

-- How many entries to ask for next: as many as the bytes left hold at the mean size
-- read so far, and one more, the one that crosses the bound and so ends the page
-- (of events of one size, a page reads the entries it keeps and that one). At most
-- GROWTH times as many as were read so far: events larger than those before them (a
-- small-event topic's occasional large one) cost at most that many times the entries
-- the page keeps; and a page of 500 small events takes four steps (2, 16, 144, 338),
-- not nine (doubling: the storm bench's replays made 2.7 times the XRANGEs).
local function next_step(read, bytes, wanted)
  if most <= 0 then return wanted end
  if read == 0 then return math.min(FIRST_STEP, wanted) end
  local mean = math.max(bytes / read, 1)
  local fits = math.floor(math.max(most - bytes, 0) / mean) + 1
  return math.max(1, math.min(fits, GROWTH * read, wanted))
end

-- Whether the position is an entry of the log, read with the first step: from the
-- position itself, one more (an XRANGE of its own was one more command a page).
local found, start, asked = 0, ARGV[1], next_step(0, 0, count)
local step
if ARGV[3] ~= '' then
  step = redis.call('XRANGE', log, ARGV[3], '+', 'COUNT', asked + 1)
  if step[1] and step[1][1] == ARGV[3] then
    found = 1
    table.remove(step, 1)
  elseif #step > asked then
    step[#step] = nil -- (the position is not an entry: one too many came)
  end
else
  step = redis.call('XRANGE', log, start, '+', 'COUNT', asked)
end

local entries, bytes, cut = {}, 0, 0
while true do
  for _, entry in ipairs(step) do
    for _, value in ipairs(entry[2]) do
      bytes = bytes + #value
    end
    if most > 0 and bytes > most and #entries > 0 then
      cut = 1
      break
    end
    entries[#entries + 1] = entry
  end
  if cut == 1 or #step < asked or #entries >= count then break end -- (#step short: the log's end)
  start = '(' .. step[#step][1]
  asked = next_step(#entries, bytes, count - #entries)
  step = redis.call('XRANGE', log, start, '+', 'COUNT', asked)
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
