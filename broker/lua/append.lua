-- Append events to a topic's log, atomically: idempotency, the epoch, the entries,
-- closing, retention and expiry happen in one step, so two instances racing on one
-- Idempotency-Key cannot both store, no reader ever sees half a batch, and a topic
-- never outlives its expiry in part (log, meta and idempotency records together).
--
-- KEYS[1] log stream, KEYS[2] meta hash, then idempotency records: none; one for the
-- whole request (ARGV[8] = 0); or one per event (ARGV[8] = 1: streaming ingest, K:n).
-- ARGV[1] epoch to use if the log is new, ARGV[2] MAXLEN, ARGV[3] trim slack,
-- ARGV[4] max age in ms (0: none), ARGV[5] idempotency window in s, ARGV[6] TTL in
-- ms (0: kept), ARGV[7] close after the events (0|1), ARGV[8] records per event (0|1),
-- then 4 values per event: kind, data, event type ('' = none), retry ('' = none).
-- Returns {status, "epoch|id,id,...|end id"} (the end id empty unless it closed):
-- status 0 stored, 1 replayed (all of it, from idempotency records, or a close of a
-- closed topic), -1 refused: the topic is closed (the second value is its end's event id).
local log, meta = KEYS[1], KEYS[2]
local per_event = ARGV[8] == '1'
local closing = ARGV[7] == '1'

-- The log's epoch, or false when it is new: no epoch yet, its stream lost while its
-- meta survived, or deleted (DELETE leaves a marker for a while): ids of the old log
-- must not resume here. And its end's id if it is closed (read in the same call).
local function current_epoch()
  local fields = redis.call('HMGET', meta, 'epoch', 'deleted', 'closed')
  if (not fields[1]) or fields[2] or redis.call('EXISTS', log) == 0 then
    return false, false
  end
  return fields[1], fields[3]
end

-- An idempotency record answers only for the log it was written in.
local function remembered(record, epoch)
  local seen = redis.call('GET', record)
  if seen and epoch and string.sub(seen, 1, #epoch + 1) == epoch .. '|' then
    return seen
  end
  return false
end

local epoch, closed = current_epoch()
if (not per_event) and KEYS[3] then
  local seen = remembered(KEYS[3], epoch)
  if seen then return {1, seen} end
end
if epoch then
  if closed then
    if #ARGV == 8 and closing then return {1, epoch .. '||' .. closed} end
    if per_event then
      -- A resent ingest whose every line was stored before the topic closed: its
      -- answer again (the producer lost the first one), not a refusal.
      local ids = {}
      for i = 3, #KEYS do
        local seen = remembered(KEYS[i], epoch)
        if not seen then break end
        ids[#ids + 1] = string.sub(seen, #epoch + 2)
      end
      if #ids > 0 and #ids == #KEYS - 2 then
        return {1, epoch .. '|' .. table.concat(ids, ',') .. '|'}
      end
    end
    return {-1, epoch .. '.' .. closed}
  end
else
  epoch = ARGV[1]
  redis.call('DEL', log, meta)
  redis.call('HSET', meta, 'epoch', epoch)
end

local ttl_ms = tonumber(ARGV[6])
local record_ms = tonumber(ARGV[5]) * 1000
if ttl_ms > 0 and ttl_ms < record_ms then record_ms = ttl_ms end

local function add(kind, data, event, retry)
  if event ~= '' and retry ~= '' then
    return redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data, 'e', event, 'r', retry)
  elseif event ~= '' then
    return redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data, 'e', event)
  elseif retry ~= '' then
    return redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data, 'r', retry)
  end
  return redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data)
end

local ids, replayed = {}, 0
for i = 9, #ARGV, 4 do
  local record = per_event and KEYS[3 + (i - 9) / 4] or false
  local seen = record and remembered(record, epoch)
  if seen then
    ids[#ids + 1] = string.sub(seen, #epoch + 2)
    replayed = replayed + 1
  else
    local id = add(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    ids[#ids + 1] = id
    if record then redis.call('SET', record, epoch .. '|' .. id, 'PX', record_ms) end
  end
end

local end_id = ''
if closing then
  end_id = add('j', '{}', 'broker.end', '')
  redis.call('HSET', meta, 'closed', end_id)
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
  local now = redis.call('TIME')
  local cutoff = string.format('%d-0', math.floor(tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000 - max_age_ms))
  local older = redis.call('XREVRANGE', log, '(' .. cutoff, '-', 'COUNT', 1)
  if older[1] then
    redis.call('XTRIM', log, 'MINID', cutoff)
    redis.call('HSET', meta, 'trimmed', older[1][1])
  end
end

-- Expiry: a topic nobody publishes to for the TTL goes whole, by Redis itself.
if ttl_ms > 0 then
  redis.call('PEXPIRE', log, ttl_ms)
  redis.call('PEXPIRE', meta, ttl_ms)
end

local answer = epoch .. '|' .. table.concat(ids, ',') .. '|' .. end_id
if (not per_event) and KEYS[3] then
  redis.call('SET', KEYS[3], answer, 'PX', record_ms)
end
local status = 0
if #ids > 0 and replayed == #ids and not closing then status = 1 end
return {status, answer}
