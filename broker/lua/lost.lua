-- Record that a log lost events: a live reader found it shorter than what it had read
-- (an asynchronous failover, an AOF's lost second). A client that was away before the
-- lost events, and comes back with an older id, reads on past them: the replay tells it
-- where they were (range.lua returns `lost_after`: a page that goes on past it sends an
-- "unknown" gap there), instead of skipping them in silence.
-- KEYS[1] log stream, KEYS[2] meta hash; ARGV[1] the log's epoch, ARGV[2] the newest id
-- the reader had read (gone now).
-- Returns the newest entry kept before the loss (the last event a client could have),
-- or false if the log is another one now.
local log, meta = KEYS[1], KEYS[2]
if redis.call('HGET', meta, 'epoch') ~= ARGV[1] then
  return false
end
local kept = redis.call('XREVRANGE', log, ARGV[2], '-', 'COUNT', 1)
local after = kept[1] and kept[1][1] or (redis.call('HGET', meta, 'trimmed') or '0-0')
redis.call('HSET', meta, 'lost_after', after)
return after
