-- A streaming ingest's line records: the part of append.lua whose checks only an ingest
-- with an Idempotency-Key runs (ARGV[8] = 1), kept apart so that each reads apart (the
-- whole was 556 lines), not run apart. broker/redis_scripts.py puts this file's text
-- in place of append.lua's include line as it reads the script, so Redis runs one
-- script, atomic whole as before, and this part shares append.lua's locals (KEYS and
-- ARGV as read there, `epoch`, `now`, `entry_kept`, ...) and counts against the same
-- 200 of its main chunk. Each function here is `local`, defined before append.lua uses
-- it below the include: `ingest_state` (and the ingest_* it reads), `remembered_line`,
-- `prune_lines`, and `replays` filled. The keys and values it reads are those of
-- append.lua's header (KEYS[5], KEYS[6], the "n:id" and ":b" of ARGV, the
-- refusals -3, -4, -6).

-- The ingest's lines: "K\n" holds "top|since": the highest line number recorded,
-- and when this ingest began (ms), which names it. A line's record is
-- "epoch|id|since": the ingest it belongs to, not when it was written (Redis's clock
-- stepping back mid-ingest gave later lines a time before `since`, and a resend
-- stored them again). An ingest whose last line is past the window is over: the
-- next one under its key begins anew (a window after the old one's last line, so
-- named after it), and the old records (until pruned or overwritten) no longer answer
-- (they answered again once a new line refreshed the ingest's time).
-- "K\nh" holds "high|since": the highest line number this ingest (named by since)
-- recorded (or a body of it ended at, blank), apart from the top (which an older ingest
-- under the key may have left higher), so that lines stored by two streams under the
-- key can be kept in one order (see `out_of_step` below). Its own field: a head of three values read as none by an
-- older instance, mid-deploy, had an ingest under way taken for a new one.
local ingest_top, ingest_since, ingest_live, ingest_high = false, false, false, 0
local ingest_head_since = false  -- (the since "K\n" holds, live or not)
local function ingest_state()
  if ingest_since then return ingest_top, ingest_since end
  local fields = redis.call('HMGET', lines, ingest .. '\n', ingest .. '\nh')
  local top, since = 0, false
  if fields[1] then
    local t, s = string.match(fields[1], '^(%d+)|(%d+)$')
    top, since = tonumber(t) or 0, tonumber(s)
  end
  ingest_head_since = since
  local at = redis.call('ZSCORE', lines_written, ingest)
  ingest_live = since and at and tonumber(at) > now() - window_ms
  if not ingest_live then since = now() end
  local h, of = string.match(fields[2] or '', '^(%d+)|(%d+)$')
  if ingest_live and tonumber(of) == since then ingest_high = tonumber(h) end
  ingest_top, ingest_since = top, since
  return top, since
end

-- The id line n of the ingest was stored as, in this log and this ingest; or false.
local function remembered_line(n, epoch)
  if not epoch then return false end
  local _, since = ingest_state()
  local seen = redis.call('HGET', lines, ingest .. '\n' .. n)
  if not seen then return false end
  local was_epoch, id, at = string.match(seen, '^([^|]+)|([^|]+)|(%d+)$')
  if was_epoch == epoch and tonumber(at) >= since then return id end
  return false
end

-- Forget the lines of ingests whose last line is past the window: up to 1024 numbers
-- at a time (a line's field and the one after it), the highest first (the rest go at a
-- later prune). An older instance's prune leaves the latter, which answer for their
-- ingest only, until a later prune of the key or the hash's expiry.
local function prune_lines()
  local old = redis.call('ZRANGEBYSCORE', lines_written, '-inf', now() - window_ms, 'LIMIT', 0, 4)
  for _, key in ipairs(old) do
    local top = tonumber(string.match(redis.call('HGET', lines, key .. '\n') or '0', '^%d+'))
    local low = math.max(1, top - 1023)
    local fields = {}
    for n = low, top do
      fields[#fields + 1] = key .. '\n' .. n
      fields[#fields + 1] = key .. '\n' .. n .. '\n>'  -- (see `recorded_after`)
    end
    if #fields > 0 then redis.call('HDEL', lines, unpack(fields)) end
    if low > 1 then
      redis.call('HSET', lines, key .. '\n', (low - 1) .. '|0')
    else
      redis.call('HDEL', lines, key .. '\n', key .. '\nh', key .. '\n0\n>')
      redis.call('ZREM', lines_written, key)
    end
  end
end

-- The log kept, its newest lines lost: a failover to a replica that had not received
-- them yet (replication is asynchronous; a script's writes replicate whole, so their
-- records went with them). The ingest went on: its next line stored after the last
-- one kept, the producer answered ids that no longer exist, and its resend stored the
-- lost lines after the later ones (audit). So the line the request stored last must
-- still be recorded, for this log and this ingest (one HGET, whoever wrote since);
-- refused whole, the resend replays the lines kept and stores the rest after them, in
-- order. An ingest past its window has its records pruned by design (an open one's
-- are kept answering by keep_lines.lua, but not if the store was out of reach for most
-- of the window while it paused), and so has one whose every line a failover lost (its
-- records and when it last wrote went too): there the entry it stored last tells,
-- whatever the window (a read of the entry, at such an append only). It was a line stored within
-- half the window by its id's time that had to be recorded: a pause past half the
-- window (a store slow to answer after one near the body's timeout) went on, untold.
-- Past the window its lines kept answer no more: a resend of the whole stream under its
-- key stored them twice, so the refusal says so ('unrecorded'), and the ingest tells
-- which lines are kept (api/ingest.py) as it does one without a key.
-- And past the window with nothing lost (its entry still there) the ingest's lines are
-- no longer recorded either: it went on, its lines from then on recorded anew under its
-- key as a new ingest's, and the whole stream resent with its key (as its contract
-- says it may be) stored its early lines twice, silently. So a line of it is refused
-- (-6), nothing stored nor recorded: the producer is told to send the rest as a stream
-- of its own. Not its close (no line: nothing recorded anew, all of its lines stored).
-- And an ingest under way under its key that is not its own is another's, begun past its
-- window (a resend): the line it stored last recorded there under another id, it went
-- on in that one, after the other's lines; not recorded there, its entry kept (still in
-- the log, or trimmed by retention: no failover lost it), it was told its lines lost, and
-- its resend stored them again.
-- But where the ingest under way is the request's own (it says which: "n:id::s", the
-- `since` its earlier appends were answered), that line not recorded in it (or recorded
-- under another id: a stream that stored it again since) was lost by a failover, its
-- record and its entry together, whatever retention trimmed since: its records are live,
-- and a line's record is written with its entry, never pruned while its ingest is live.
-- The entry alone could not tell: retention trimming past where it was (other writers'
-- entries, after the failover) made it one trimmed, and the line was refused -6 (its
-- producer sent the rest as a stream of its own: the lost line in silence). A request
-- that cannot say (its appends answered no since) is told by the entry, as before.
-- And where its ingest began within the window (by Redis's clock) and its records are
-- no more ("K\n" gone, or naming another: a lapse, which would leave them, needs the
-- window past its last write, and so past its beginning), every line of it was lost,
-- none kept: told so ('0-0', as an ingest without a key is told the newest of its
-- entries kept), whatever the trim (its entry trimmed, it was refused -6: its producer
-- sent the rest as a stream of its own, the lost lines in silence); or, another ingest
-- under way under its key, as above ('': its resend replays what that one recorded).
-- (A clock stepped back between its beginning and its last write can make records
-- lapse within the window after its beginning; so can an instance whose window is
-- shorter, BROKER_IDEMPOTENCY_SECONDS mid-change, which takes the records this one
-- holds live for lapsed and begins another ingest under the key. Neither lost a line:
-- so its last entry must be gone from the log too (a failover loses an entry and its
-- records together); still there, it goes on as below (records lapsed: -6). Trimmed
-- since, that cannot be told: told lost, none kept.)
-- Its close, or its end's check of the blank lines its body ended on, goes on (no line:
-- nothing recorded anew), its records lapsed: checked against, and counted in, no
-- ingest under way, which is another's (counted there, the other stream, the same one
-- resent, was refused at its next line; or, past them, this one was: 400, every line
-- of it stored), as where there is none.
local function entry_gone(id)  -- ('0-0', an entry not named, taken as gone)
  return id == '0-0' or not entry_kept(id)
end
local lapsed = false  -- (its records: its close or end goes on, apart from any ingest)
if per_event and stored_before > 0 and epoch then
  ingest_state()
  local recorded = ingest_live and remembered_line(stored_before, epoch)
  if recorded and (recorded == stored_entry or stored_entry == '0-0') then
    -- (its own ingest, under way; '0-0': a caller that does not say which entry)
  elseif ingest_live and ingest_since == tonumber(stored_since) then
    return {-4, ''}  -- (its own ingest under way, its last line lost: see above)
  elseif stored_since and ingest_head_since ~= tonumber(stored_since)
    and now() - tonumber(stored_since) < window_ms
    and not redis.call('XREVRANGE', log, stored_entry, stored_entry)[1] then
    return {-4, ingest_live and '' or '0-0'}  -- (every line of its ingest lost: see above)
  elseif ingest_live and not recorded and entry_gone(stored_entry) then
    return {-4, ''}  -- (a failover lost its last line: the record and the entry together)
  elseif stored_entry and stored_entry ~= '0-0' and not entry_kept(stored_entry) then
    -- (lost; recorded again since by another stream under its key, open at once, the
    -- ingest under way replays it to a resend of the whole stream: not 'unrecorded',
    -- whose producer sends the lines after those kept as a stream of its own, and so
    -- stored that line twice)
    return {-4, recorded and '' or 'unrecorded'}
  elseif names > 1 then  -- (its key, then a line number per event)
    -- On a closed topic, -1 (as `differs_at` below): it was -6, the producer sent the
    -- rest under K+n and only then was told the topic closed. Its records lapsed, none
    -- of its lines can be found a replay, and the topic refuses anything new. Not the
    -- -4s above: lines it was answered for are lost, which the producer must learn
    -- (told only "closed", it took them for stored); its resend is then refused -1.
    if closed then return {-1, epoch .. '.' .. closed} end
    return {-6, ''}
  else
    lapsed = true
  end
end

-- A resent ingest's lines recorded already, each checked against the entry stored for
-- it: a resend whose line n is another line (the stream made again, as a model asked
-- twice answers otherwise) is refused whole, before anything is stored. It was answered
-- with line n's first id and its later lines stored after the first body's: two
-- streams mixed, in silence (audit). An entry trimmed since cannot be compared.
local replays = {}  -- the id of each event recorded already (by its place), or nil
local function same_event(id, kind, data, event, retry)
  local entry = redis.call('XRANGE', log, id, id)[1]
  if not entry then return true end
  local fields = {}
  for f = 1, #entry[2], 2 do fields[entry[2][f]] = entry[2][f + 1] end
  return fields.k == kind and fields.d == data and (fields.e or '') == event
    and (fields.r or '') == retry
end
-- Two streams under one key (one after the other, or open at once: a retry while the
-- first connection still lives on a broker) store each line once, by whichever brings
-- it first. Lines are numbered blank ones included, and a blank line is not sent: where
-- two differed by one they mixed, in silence (both 201), a line stored where the other
-- has a blank line (the other going on after it), or after a later line of the other
-- (out of order). So a stream is refused at its first line out of step with those
-- recorded up to the ingest's highest: a line recorded where it has a blank one (before
-- its first, `after` 0: the store's contract has a request's lines before the first it
-- sends blank; between two; after its last, its body ended so: "n:id:b", which counts
-- them in the highest, so that a line brought there later is refused too), or one of
-- its own where none is recorded. Looked at only when lines past the last it stored are
-- recorded (another stream went ahead of it): a lone stream pays a comparison an append.
-- A line is recorded only above all those recorded (the others are refused here), so the
-- first recorded after line n is n+1, or the one whose stream went on from n past blank
-- lines: it wrote "K\nn\n>" = "line|since" then. A few HGETs a line, where one a number
-- held Redis 2.5 us each (a stream behind another's 1M blank lines: 2.5 s, every topic
-- waiting). An older instance writes none: mid-deploy, a line it recorded past blank
-- lines is not found, and a stream blank there too is refused at its own next line, or
-- (that line above all recorded, or its end) not at all, as before these checks.
local function recorded_after(n, epoch)  -- (its number, or false)
  if remembered_line(n + 1, epoch) then return n + 1 end
  local next_line = redis.call('HGET', lines, ingest .. '\n' .. n .. '\n>')
  local line, of = string.match(next_line or '', '^(%d+)|(%d+)$')
  if tonumber(of) == ingest_since and remembered_line(line, epoch) then return tonumber(line) end
  return false
end
local function out_of_step(previous, line, seen, epoch)  -- (the line where, or false)
  local skipped = line > previous + 1 and recorded_after(previous, epoch)
  if skipped and skipped < line then return skipped end
  return line <= ingest_high and not seen and line
end
-- A stream refused at its line n, out of step or another line where one is recorded:
-- -3, but on a closed topic -1, as any publish there that is not a replay of what it
-- stored (it was -3, a 400 there alone: the stream is not the one stored, so none of
-- it would be a replay, and the topic refuses anything new). A replay of lines stored
-- before the close, in step, is still answered their ids (append.lua, `closed`).
local function differs_at(line, epoch)
  if closed then return {-1, epoch .. '.' .. closed} end
  return {-3, line}
end
-- A body ended with blank lines after its last line counts them in its ingest's highest.
-- A body of blank lines only stored no line, which begins an ingest's records: so, where
-- no ingest under its key is under way, it begins one here, recorded as its first line
-- would be (its records kept as long; not on a closed topic, where a line is refused
-- anyway). Else a stream bringing a line there after it was stored, both answered 201,
-- the two differing, where one brought before it refused it.
local function count_blank_end(through)
  if ingest_live then
    redis.call('HSET', lines, ingest .. '\nh', through .. '|' .. ingest_since)
    return
  end
  local top, since = ingest_state()
  redis.call('HSET', lines, ingest .. '\n', top .. '|' .. since, ingest .. '\nh', through .. '|' .. since)
  redis.call('ZADD', lines_written, now(), ingest)
  if not has_records then redis.call('HSET', meta, 'records', 1) end
  -- With a TTL, they go when the log goes: no publish, no later expiry (given the whole
  -- TTL from here, they outlived the log by as long as it had gone without a publish).
  local ttl_ms = tonumber(ARGV[6])
  local expiry = ttl_ms > 0 and redis.call('PTTL', log) or -1
  if expiry <= 0 then expiry = ttl_ms > 0 and ttl_ms or window_ms end
  redis.call('PEXPIRE', lines, expiry)
  redis.call('PEXPIRE', lines_written, expiry)
end
if per_event and epoch and not lapsed then
  ingest_state()
  local ahead = ingest_high > stored_before
  local previous = stored_before  -- (this stream's line before it)
  for i = first_value, #ARGV, 4 do
    local place = (i - first_value) / 4
    local line = ARGV[11 + place]
    local seen = remembered_line(line, epoch)
    if ahead then  -- (tonumber, a strtod, in here: some 1k instructions an append, callgrind)
      local differs = out_of_step(previous, tonumber(line), seen, epoch)
      if differs then return differs_at(tostring(differs), epoch) end
      previous = tonumber(line)
    end
    if seen then
      if not same_event(seen, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]) then
        return differs_at(line, epoch)
      end
      replays[place] = seen
    end
  end
  local differs = ahead and blank_through > 0 and recorded_after(stored_before, epoch)
  if differs and differs <= blank_through then return differs_at(tostring(differs), epoch) end
  if blank_through > ingest_high and (ingest_live or (stored_before == 0 and not closed)) then
    count_blank_end(blank_through)
  end
end
if blank_through > 0 and first_value > #ARGV and not closing then  -- (nothing to store)
  return {0, (epoch or '') .. '||'}
end
