-- Keep an open streaming ingest's line records answering: as if it had just written a
-- line. Its records answer for the idempotency window after its last line (append.lua);
-- but its body's timeout runs from each read, so blank lines, or a line sent in slow
-- pieces, kept it open past the window: its records lapsed, its next line began anew
-- under its key, and a resend of the whole stream stored its early lines twice. The
-- ingest's watch (api/ingest_records.py) sends this when its last write is older than
-- a fraction of the window, never per line. Not WAITed for a replica under replicated
-- durability: a keep a failover lost leaves the records answering for the rest of the
-- window, and the next keep lands on the new primary (RedisStreamStore.keep_lines).
-- KEYS[1] log stream, KEYS[2] meta hash, KEYS[3] the ingests' line records (a hash),
-- KEYS[4] when each ingest last wrote (a sorted set, ms); ARGV[1] the ingest's key K,
-- ARGV[2] the epoch of the log its lines went to, ARGV[3] the idempotency window in s.
-- Returns 1 kept, or 0: nothing to keep (the log is another, or none; or the ingest's
-- records answer no more: past the window, or lost with every line of it), and nothing
-- written: records that lapsed are not revived (a prune may have taken part of them
-- already), nor any begun; the ingest's next append tells what it must.
local log, meta, lines, lines_written = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ingest, epoch, window_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]) * 1000
local fields = redis.call('HMGET', meta, 'epoch', 'deleted')
if fields[1] ~= epoch or fields[2] or redis.call('EXISTS', log) == 0 then return 0 end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local at = redis.call('ZSCORE', lines_written, ingest)
if not at or tonumber(at) <= now - window_ms then return 0 end
redis.call('ZADD', lines_written, now, ingest)
-- The records' expiry, as an append sets it: the window, for a topic kept for good. A
-- topic with a TTL keeps the one its last publish set on all its keys: it still
-- expires whole when nobody publishes to it for its TTL (and the ingest is told its
-- log was lost), however long an ingest stays open.
if redis.call('PTTL', log) < 0 then
  redis.call('PEXPIRE', lines, window_ms)
  redis.call('PEXPIRE', lines_written, window_ms)
end
return 1
