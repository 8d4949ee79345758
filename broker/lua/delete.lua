-- Delete a topic now. Its events go at once; a marker entry of the same epoch takes
-- their place for a short while, so that every instance's live reader, which reads
-- on from where it was, hands it to the topic's subscribers: they are told
-- (a "deleted" gap) and end, on whichever instance they are. Everyone else sees no
-- log (state.lua, range.lua); the next append starts a new one, with a new epoch,
-- and idempotency records of the old log no longer answer (append.lua).
-- KEYS[1] log stream, KEYS[2] meta hash, KEYS[3] to KEYS[6] its idempotency records
-- and their times (gone with the log); ARGV[1] how long the marker lingers (ms).
-- Returns the marker's id, or false if there was no topic.
local log, meta = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', meta, 'epoch', 'deleted')
if redis.call('EXISTS', log) == 0 or (not fields[1]) or fields[2] then
  return false
end
redis.call('XTRIM', log, 'MAXLEN', 0)  -- keeps the last id: the marker comes after it
local marker = redis.call('XADD', log, '*', 'ep', fields[1], 'k', 'j', 'd', '{}', 'e', 'broker.deleted')
redis.call('HSET', meta, 'deleted', marker)
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('PEXPIRE', log, ARGV[1])
redis.call('PEXPIRE', meta, ARGV[1])
return marker
