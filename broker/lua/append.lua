-- Append events to a topic's log, atomically: idempotency, the epoch, the entries,
-- closing, retention and expiry happen in one step, so two instances racing on one
-- Idempotency-Key cannot both store, no reader ever sees half a batch, and a topic
-- never outlives its expiry in part (log, meta and idempotency records together).
--
-- KEYS[1] log stream, KEYS[2] meta hash, KEYS[3] the idempotency records (a hash:
-- publisher's key -> its answer), KEYS[4] when each was written (a sorted set, ms),
-- KEYS[5] streaming ingests' line records (a hash: "K\nn" -> line n's answer, "K\n" ->
-- the highest n recorded, "K\nh" -> the highest n of the ingest under way, blank
-- ones at an end counted, and "K\nn\n>" -> the line recorded next after n, past blank
-- ones), KEYS[6] when each ingest K last wrote one (ms).
-- ARGV[1] epoch to use if the log is new ('' when it must find its log: never new),
-- ARGV[2] MAXLEN, ARGV[3] trim slack,
-- ARGV[4] max age in ms (0: none), ARGV[5] idempotency window in s, ARGV[6] TTL in
-- ms (0: kept), ARGV[7] close after the events (0|1), ARGV[8] records per event (0|1),
-- ARGV[9] how many record names follow (R): none; one for the whole request
-- (ARGV[8] = 0); or, for a streaming ingest (ARGV[8] = 1), its key K then each
-- event's line number n (line n is "K:n"); then the R names; then the epoch of the
-- log the append must find ('' = any: a new log may be begun); then, for a streaming
-- ingest, "n:id": the number of the last line its request stored before this append
-- (0: none yet, its lines before blank) and the id of its entry (0-0: none yet), and
-- ":b" when its body ended with blank lines after n: its last line (no events), then
-- ":s", once an append answered it, the ingest its lines went to (its `since`, below; ":b"
-- empty if none: "n:id::s"); for one
-- without an Idempotency-Key (ARGV[8] = 0), the id of the entry its request stored last
-- (0-0: none yet); 0 for anything else; then 4 values per event: kind, data, event type
-- ('' = none), retry ('' = none).
--
-- The records live in hashes, not a key each, so that they live as long as their
-- topic: each append sets the topic's TTL on them too (one call, however many
-- records), where a key per record expired a TTL after its own write, while the
-- topic lived on (a producer resending a long stream stored its early lines again).
-- A publisher's record answers for the idempotency window after its write; older
-- ones are pruned as records are written. An ingest's lines are apart from the
-- publishers' keys (a publish keyed "K:1" is not line 1 of the ingest K: it had
-- made that line skipped, and both answered 500), and answer together, for the
-- window after the ingest's last line (a stream longer than the window, resent
-- whole, stored its early lines again); then they are pruned together.
-- Returns {status, "epoch|id,id,...|end id"} (the end id empty unless it closed; a
-- streaming ingest's lines stored or replayed: "epoch|id,...|end id|since", the ingest
-- they went to, which its later appends name in "n:id::s"):
-- status 0 stored (or an ingest's end, ":b", checked: nothing to store), 1 replayed (all
-- of it, from idempotency records, or a close of a closed topic), -1 refused: the
-- topic is closed (the second value is its end's event id),
-- -2 refused: the log is not the one it must find (the second value: its epoch, or ''),
-- -5 refused: the log it must find was deleted (DELETE: the second value is ''),
-- -3 refused: a resent line is not the one stored under its number, or the stream is
-- out of step with the lines recorded under its key (`out_of_step`; the second value:
-- that number; on a closed topic it is -1 instead: `differs_at`), -4 refused: the line the request stored last is no longer recorded, or
-- (its records past the window, or no Idempotency-Key) its entry is no longer in the log
-- (lost with the newest writes: a failover; the second value is '', or 'unrecorded' for an
-- ingest whose records were past the window: none of its lines kept is replayed; or an id
-- that tells which of its entries the log kept, those at or before it: without an
-- Idempotency-Key, the newest entry of such an ingest kept; with one, 0-0, none, where
-- its ingest began within the window and its records are gone),
-- -6 refused: the lines of the streaming ingest under way are no longer recorded (its
-- records past the window, its entry still in the log: the second value is ''; on a
-- closed topic it is -1 instead: none of its lines can be found a replay).
local log, meta, records, written = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lines, lines_written = KEYS[5], KEYS[6]
local per_event = ARGV[8] == '1'
local ingest = per_event and ARGV[10]  -- a streaming ingest's key K
local closing = ARGV[7] == '1'
local names = tonumber(ARGV[9])
local must_find = ARGV[10 + names]  -- (a streaming ingest under way: its log's epoch)
local stored_before = 0  -- (and the last line it stored)
local stored_entry = false  -- (and the entry it stored last)
local blank_through = 0  -- (and, its body ended, its last line: those after n blank)
local stored_since = false  -- (and the ingest its lines went to, as text: false, not known)
if per_event then
  local n, id, b, s = string.match(ARGV[11 + names], '^(%d+):(%d+%-%d+):?(%d*):?(%d*)$')
  stored_before, stored_entry, blank_through = tonumber(n), id, b ~= '' and tonumber(b) or 0
  stored_since = s ~= '' and s  -- (tonumber where read: a strtod, see ingest_lines.lua)
elseif ARGV[11 + names] ~= '0' then
  stored_entry = ARGV[11 + names]
end
local keyless = stored_entry and not per_event  -- (an ingest without an Idempotency-Key)
local first_value = 12 + names  -- the first event's first value
local window_ms = tonumber(ARGV[5]) * 1000
local now_ms = false  -- Redis' clock, read once, when records or retention by age need it
local function now()
  if not now_ms then
    local time = redis.call('TIME')
    now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  end
  return now_ms
end

-- The log's epoch, or false when it is new: no epoch yet, its stream lost while its
-- meta survived, or deleted (DELETE leaves a marker for a while): ids of the old log
-- must not resume here. And its end's id if it is closed, and whether it has
-- idempotency records, and, a log made over a deleted one's marker, when that marker
-- would have gone (all read in the same call).
local deleted_epoch, deleted_marker = false, false  -- a deleted log this one replaces
local number = 0  -- the number of the log's newest entry (see `add`)
local function current_epoch()
  local fields = redis.call('HMGET', meta, 'epoch', 'deleted', 'closed', 'records', 'n', 'deleted_until')
  if fields[2] then deleted_epoch, deleted_marker = fields[1], fields[2] end
  if (not fields[1]) or fields[2] or redis.call('EXISTS', log) == 0 then
    return false, false, false
  end
  number = tonumber(fields[5]) or 0
  return fields[1], fields[3], fields[4], fields[6]
end

-- An idempotency record answers only for the log it was written in, and within the
-- window after its write.
local function remembered(name, epoch)
  if not epoch then return false end
  local seen = redis.call('HGET', records, name)
  if seen and string.sub(seen, 1, #epoch + 1) == epoch .. '|' then
    local at = redis.call('ZSCORE', written, name)
    if at and tonumber(at) > now() - window_ms then return seen end
  end
  return false
end

local function remember(name, answer)
  redis.call('HSET', records, name, answer)
  redis.call('ZADD', written, now(), name)
end

-- Whether the log of this epoch was deleted (DELETE), as far as the meta still says:
-- its marker lingering, or a log created since naming it among those deleted before.
local function was_deleted(of_epoch)
  if deleted_epoch == of_epoch then return true end
  local known = redis.call('HMGET', meta, 'deleted_epoch', 'deleted_before')
  if known[1] == of_epoch then return true end
  for deleted in string.gmatch(known[2] or '', '([^:%s]+):') do  -- ("epoch:marker ...")
    if deleted == of_epoch then return true end
  end
  return false
end

-- (deleted_until: a log made over a deleted one's marker, when the marker would have
-- gone, ms: see Expiry. A 4th value, not a local the function sets: a local declared
-- above the closures cost every append some 2k instructions, callgrind of redis-server)
local epoch, closed, has_records, deleted_until = current_epoch()
-- A streaming ingest under way whose log is gone (a Redis restarted without its data,
-- the topic deleted or expired): its lines stored before are lost, and its next ones
-- must not begin a new log. Stored there, a resend under its key found them recorded
-- and stored the lost lines after them: out of order (audit). Deleted, it is told so:
-- told only "gone", its producer resent the stream and created again a topic its
-- owner had deleted on purpose.
if must_find ~= '' and epoch ~= must_find then
  if was_deleted(must_find) then return {-5, ''} end
  return {-2, epoch or ''}
end

-- Whether the log still holds the entry of this id, or retention removed it (at or
-- before the newest id trimmed, which a failover cannot have lost: the replica held a
-- later entry). An entry read back into Lua costs about a third of a one-line append
-- (callgrind).
local function at_or_before(id, other)  -- (two entry ids, "ms-seq")
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  local other_ms, other_seq = string.match(other, '^(%d+)-(%d+)$')
  ms, seq, other_ms, other_seq = tonumber(ms), tonumber(seq), tonumber(other_ms), tonumber(other_seq)
  return ms < other_ms or (ms == other_ms and seq <= other_seq)
end
local function entry_kept(id)
  if redis.call('XREVRANGE', log, id, id)[1] then return true end
  return at_or_before(id, redis.call('HGET', meta, 'trimmed') or '0-0')
end

-- A streaming ingest's line records and the checks only its appends run, before
-- anything is stored, in ingest_lines.lua (read in here: one script): the line its
-- request stored last still recorded (-4: a failover lost it; -6, or -4 'unrecorded':
-- its records past the window), each resent line the one stored under its number
-- (-3), its lines in step with another stream's under its key (-3: `out_of_step`,
-- `recorded_after`), and its end's blank lines (":b": nothing to store). It defines
-- `ingest_state`, `remembered_line`, `prune_lines` and `replays`, used below.
--#include ingest_lines.lua

-- The same failover under an ingest without an Idempotency-Key: no line records, so
-- the entry the request stored last must still be in the log, unless retention removed
-- it. Its next line went on after the lines kept, in silence: readers that had read
-- the lost ones and those that came later disagreed (audit). Once per append, however
-- many lines, and mostly one HGET: such an ingest's append writes its newest entry's id
-- in the meta ('keyless'), with the entry (a replica holds both or neither), so finding
-- it still there proves the entry kept, whatever was written since. Else (another such
-- ingest wrote it since) the entry read back: the HGET and the meta's field cost some 6%
-- of a one-line append. (Read in current_epoch's HMGET instead, it saved a keyless
-- append 1.7k instructions and cost every other append as many, callgrind: kept apart.)
-- The field only grows (ids do), but for a failover: found before the entry, the
-- append that wrote the entry (and the field past it) was lost, whatever retention
-- trimmed since. The log's trimming alone cannot tell: past a failover, other writers'
-- entries, after the lost one's, were trimmed, and `entry_kept` took the lost entry for
-- one trimmed (found by tests/integration/test_ingest_lines_probe.py). The field then
-- tells which of the ingest's entries were kept, those at or before it (the newest such
-- entry kept), so it is the refusal's second value. Past the failover, once another
-- such ingest wrote it (after the lost entry), only the entry tells, and a trim past it
-- hides the loss (README, "When a streaming ingest's lines are lost").
if keyless and stored_entry ~= '0-0' and epoch then
  local newest_keyless = redis.call('HGET', meta, 'keyless')
  if newest_keyless ~= stored_entry then
    if not newest_keyless or not at_or_before(stored_entry, newest_keyless) then
      return {-4, newest_keyless or '0-0'}
    end
    if not entry_kept(stored_entry) then return {-4, ''} end
  end
end

if (not per_event) and names == 1 then
  local seen = remembered(ARGV[10], epoch)
  if seen then return {1, seen} end
end
if epoch then
  if closed then
    if #ARGV == first_value - 1 and closing then return {1, epoch .. '||' .. closed} end
    if per_event then
      -- A resent ingest whose every line was stored before the topic closed: its
      -- answer again (the producer lost the first one), not a refusal. (Each was
      -- checked, the same line and in step, in ingest_lines.lua: one that is not was
      -- refused there, -1 as here.)
      local ids = {}
      for i = 2, names do  -- (ARGV[10] is the ingest's key, its line numbers follow)
        local seen = remembered_line(ARGV[9 + i], epoch)
        if not seen then break end
        ids[#ids + 1] = seen
      end
      if #ids > 0 and #ids == names - 1 then
        return {1, epoch .. '|' .. table.concat(ids, ',') .. '|'}
      end
    end
    return {-1, epoch .. '.' .. closed}
  end
else
  epoch = ARGV[1]
  -- First a write that Redis refuses when it is out of memory (maxmemory): in a
  -- script only the first write is checked, and DEL, which frees memory, is let
  -- through, and with it the whole append: a new topic's first publish (one per LLM
  -- generation) passed maxmemory without limit (audit). Set again below, after the DEL.
  redis.call('HSET', meta, 'epoch', epoch)
  -- Logs deleted before the one this replaces (its meta says), each "epoch:marker",
  -- the newest first: a client of one of them is told "deleted" too (state.lua).
  local before = {}
  local linger = -1  -- (what is left of the marker's, ms)
  if deleted_epoch then
    linger = redis.call('PTTL', meta)
    local earlier = redis.call('HMGET', meta, 'deleted_epoch', 'deleted_at', 'deleted_before')
    if earlier[1] and earlier[2] then before[1] = earlier[1] .. ':' .. earlier[2] end
    for deletion in string.gmatch(earlier[3] or '', '%S+') do
      if #before < 16 then before[#before + 1] = deletion end
    end
  end
  -- (an old log's records answer no more)
  redis.call('DEL', meta, records, written, lines, lines_written)
  if #before > 0 then redis.call('HSET', meta, 'deleted_before', table.concat(before, ' ')) end
  if deleted_epoch then
    -- Published again right after a DELETE. The stream stays, emptied: its ids go
    -- on after the marker's (a new stream's first id, in the marker's millisecond,
    -- could lie at or before where the live readers are, and they would never read
    -- it). A live reader that had not read the marker yet never will, so the new
    -- log says which epoch was deleted and where: its streams are still told
    -- "deleted", and end.
    redis.call('XTRIM', log, 'MAXLEN', 0)
    redis.call('PERSIST', log)
    redis.call('HSET', meta, 'deleted_epoch', deleted_epoch, 'deleted_at', deleted_marker)
    if linger > 0 then
      deleted_until = now() + linger
      redis.call('HSET', meta, 'deleted_until', deleted_until)
    end
  else
    redis.call('DEL', log)
  end
  redis.call('HSET', meta, 'epoch', epoch)
  has_records = false
end

local ttl_ms = tonumber(ARGV[6])

-- Each entry carries its number in its log ('n': 1, 2, ... the meta hash holds the
-- last one issued, written once per append). A live reader that reads entries whose
-- first does not follow the last it read knows that entries between were removed,
-- whoever removed them: an instance with another retention than its own (a rolling
-- deploy that changes it, a DirectPublisher given its own) trims what its own
-- retention would have kept; a failover loses what it had read.
local numbered = number
local newest = false  -- the id of the newest entry added (see 'keyless' above)
local function add(kind, data, event, retry)
  numbered = numbered + 1
  local n = numbered
  if event ~= '' and retry ~= '' then
    return redis.call('XADD', log, '*', 'ep', epoch, 'n', n, 'k', kind, 'd', data, 'e', event, 'r', retry)
  elseif event ~= '' then
    return redis.call('XADD', log, '*', 'ep', epoch, 'n', n, 'k', kind, 'd', data, 'e', event)
  elseif retry ~= '' then
    return redis.call('XADD', log, '*', 'ep', epoch, 'n', n, 'k', kind, 'd', data, 'r', retry)
  end
  return redis.call('XADD', log, '*', 'ep', epoch, 'n', n, 'k', kind, 'd', data)
end

local ids, replayed, top_line = {}, 0, false
local ingest_named = false  -- (the ingest a streaming ingest's lines went to: its since)
local previous = stored_before  -- (the line before, in this stream)
for i = first_value, #ARGV, 4 do
  local place = (i - first_value) / 4
  local line = per_event and ARGV[11 + place] or false
  local seen = replays[place]  -- (none in a log begun by this append)
  if seen then
    ids[#ids + 1] = seen
    replayed = replayed + 1
    if line then previous = tonumber(line) end
  else
    local id = add(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    newest = id
    ids[#ids + 1] = id
    if line then
      local _, since = ingest_state()  -- (the ingest's name, not the time)
      local record = ingest .. '\n' .. line
      top_line = tonumber(line)
      if top_line == previous + 1 then
        redis.call('HSET', lines, record, epoch .. '|' .. id .. '|' .. since)
      else  -- (past blank lines: `recorded_after` finds it from the line before)
        redis.call(
          'HSET', lines, record, epoch .. '|' .. id .. '|' .. since,
          ingest .. '\n' .. previous .. '\n>', line .. '|' .. since)
      end
      previous = top_line
    end
  end
end
if per_event then
  -- (the top only grows: pruning an old ingest reaches every line it left)
  local top, since = ingest_state()
  local high = math.max(ingest_high, top_line or 0)
  redis.call(
    'HSET', lines, ingest .. '\n', math.max(top, top_line or 0) .. '|' .. since,
    ingest .. '\nh', high .. '|' .. since)
  redis.call('ZADD', lines_written, now(), ingest)
  ingest_named = since
end

local end_id = ''
if closing then
  end_id = add('j', '{}', 'broker.end', '')
  newest = end_id
  redis.call('HSET', meta, 'closed', end_id)
end
if numbered > number and keyless then
  redis.call('HSET', meta, 'n', numbered, 'keyless', newest)
elseif numbered > number then
  redis.call('HSET', meta, 'n', numbered)
end

-- Retention. Redis does not record which ids its trimming removed, and the broker
-- must know (a cursor before them gets a "trimmed" gap notice), so trim exactly
-- here and remember the newest removed id. Trimming waits for `slack` extra
-- entries, so its cost is about one entry read per append.
local maxlen, slack = tonumber(ARGV[2]), tonumber(ARGV[3])
local length = redis.call('XLEN', log)
if length > maxlen + slack then
  local old = redis.call('XRANGE', log, '-', '+', 'COUNT', length - maxlen)
  redis.call('XTRIM', log, 'MAXLEN', maxlen)
  redis.call('HSET', meta, 'trimmed', old[#old][1])
end

local max_age_ms = tonumber(ARGV[4])
if max_age_ms > 0 then
  local cutoff = string.format('%d-0', now() - max_age_ms)
  local older = redis.call('XREVRANGE', log, '(' .. cutoff, '-', 'COUNT', 1)
  if older[1] then
    redis.call('XTRIM', log, 'MINID', cutoff)
    redis.call('HSET', meta, 'trimmed', older[1][1])
  end
end

local answer = epoch .. '|' .. table.concat(ids, ',') .. '|' .. end_id
if ingest_named then answer = answer .. '|' .. ingest_named end
if (not per_event) and names == 1 then remember(ARGV[10], answer) end

-- The records: those past the window go, the oldest first, up to 128 at one of
-- about eight appends that write some, at random (the rest pay nothing for it; at
-- least one record is written each time, so they never pile up); the others live
-- as long as the topic.
if names > 0 then
  if math.random(8) == 1 then
    if per_event then
      prune_lines()
    else
      local old = redis.call('ZRANGEBYSCORE', written, '-inf', now() - window_ms, 'LIMIT', 0, 128)
      if #old > 0 then
        redis.call('HDEL', records, unpack(old))
        redis.call('ZREM', written, unpack(old))
      end
    end
  end
  if not has_records then redis.call('HSET', meta, 'records', 1) end
  has_records = true
end

-- Expiry: a topic nobody publishes to for the TTL goes whole, by Redis itself. A
-- topic kept for good keeps its records for the window after the last one written.
-- A log made over a deleted one's marker holds the memory of that deletion (and of
-- those before it: state.lua), which a client told the `deleted` gap needs, back with
-- its id while the marker would have lingered: so it lives at least as long as the
-- marker would have ('deleted_until', written when it is made), whatever the TTL
-- (a shorter one took the memory along, and the client got an `unknown` gap). Read
-- in current_epoch's HMGET; once past, the field goes (no clock read for it after).
if ttl_ms > 0 then
  local expiry = ttl_ms
  if deleted_until then
    local left = tonumber(deleted_until) - now()
    if left > expiry then
      expiry = left
    elseif left <= 0 then
      redis.call('HDEL', meta, 'deleted_until')
    end
  end
  redis.call('PEXPIRE', log, expiry)
  redis.call('PEXPIRE', meta, expiry)
  if has_records then
    redis.call('PEXPIRE', records, expiry)
    redis.call('PEXPIRE', written, expiry)
    redis.call('PEXPIRE', lines, expiry)
    redis.call('PEXPIRE', lines_written, expiry)
  end
elseif per_event then
  redis.call('PEXPIRE', lines, window_ms)
  redis.call('PEXPIRE', lines_written, window_ms)
elseif names > 0 then
  redis.call('PEXPIRE', records, window_ms)
  redis.call('PEXPIRE', written, window_ms)
end
local status = 0
if #ids > 0 and replayed == #ids and not closing then status = 1 end
return {status, answer}
