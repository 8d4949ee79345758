-- Append events to a topic's log, atomically: the idempotency check, the epoch,
-- the entries and retention happen in one step, so two instances racing on one
-- Idempotency-Key cannot both store, and no reader ever sees half a batch.
--
-- KEYS[1] log stream, KEYS[2] meta hash, KEYS[3] idempotency record (optional)
-- ARGV[1] epoch to use if the log is new, ARGV[2] MAXLEN, ARGV[3] trim slack,
-- ARGV[4] max age in ms (0: none), ARGV[5] idempotency window in s,
-- then 4 values per event: kind, data, event type ('' = none), retry ('' = none).
-- Returns {replayed (0|1), "epoch|id,id,..."}.
local log, meta, record = KEYS[1], KEYS[2], KEYS[3]

if record then
  local seen = redis.call('GET', record)
  if seen then return {1, seen} end
end

-- A log is new when it has no epoch, or when its stream is gone while its meta
-- survived (lost data): either way, ids of the old log must not resume here.
local epoch = redis.call('HGET', meta, 'epoch')
if (not epoch) or redis.call('EXISTS', log) == 0 then
  epoch = ARGV[1]
  redis.call('DEL', meta)
  redis.call('HSET', meta, 'epoch', epoch)
end

local ids = {}
for i = 6, #ARGV, 4 do
  local kind, data, event, retry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local id
  if event ~= '' and retry ~= '' then
    id = redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data, 'e', event, 'r', retry)
  elseif event ~= '' then
    id = redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data, 'e', event)
  elseif retry ~= '' then
    id = redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data, 'r', retry)
  else
    id = redis.call('XADD', log, '*', 'ep', epoch, 'k', kind, 'd', data)
  end
  ids[#ids + 1] = id
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

local answer = epoch .. '|' .. table.concat(ids, ',')
if record then
  redis.call('SET', record, answer, 'EX', ARGV[5])
end
return {0, answer}
