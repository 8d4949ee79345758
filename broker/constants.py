"""Redis key names, limits and defaults: the one place they are spelled out."""

from __future__ import annotations

import re

# Every key of a topic carries the topic in a hash tag, so a Redis Cluster keeps
# the log, its metadata and its idempotency records on one slot: the append
# script touches all of them atomically.
KEY_PREFIX = "broker"


def log_key(topic: str) -> str:
    """The Redis Stream holding the topic's events."""
    return f"{KEY_PREFIX}:{{{topic}}}:log"


def meta_key(topic: str) -> str:
    """A hash beside the log: its epoch and how far retention has trimmed it."""
    return f"{KEY_PREFIX}:{{{topic}}}:meta"


def topic_of_key(key: bytes | str) -> str:
    """The topic of one of its keys: ``broker:{topic}:...`` -> ``topic``."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[text.index("{") + 1 : text.index("}")]


_LOG_KEY_HEAD = len(f"{KEY_PREFIX}:{{")
_LOG_KEY_TAIL = len("}:log")


def topic_of_log_key(key: bytes) -> str:
    """``b"broker:{orders}:log"`` -> ``"orders"``: a log's key as a live read's reply
    names it, sliced rather than searched (``topic_of_key``), once per topic read."""
    return key[_LOG_KEY_HEAD:-_LOG_KEY_TAIL].decode()


def records_key(topic: str) -> str:
    """A hash of the topic's idempotency records: each publisher-chosen key -> the
    ids answered for it."""
    return f"{KEY_PREFIX}:{{{topic}}}:idem"


def line_records_key(topic: str) -> str:
    """A hash of the streaming ingests' line records: ``K\\nn`` (line n of the ingest
    keyed K) -> its ids. Apart from ``records_key``: a publish keyed "K:1" is not
    line 1 of the ingest K (lua/append.lua)."""
    return f"{KEY_PREFIX}:{{{topic}}}:lines"


def line_times_key(topic: str) -> str:
    """A sorted set beside the line records: when each ingest last wrote a line (ms):
    its lines answer, and go, together."""
    return f"{KEY_PREFIX}:{{{topic}}}:lines-at"


def topic_keys(topic: str) -> list[str]:
    """Every key of a topic, those the append and delete scripts touch: log, meta,
    idempotency records (a publisher's, an ingest's lines), and when they were written."""
    # Each key function's text, from one tag: six calls cost an append 4,800 instructions
    # (bench.publishing; tests/unit/test_fast_paths.py holds them to the functions).
    tag = f"{KEY_PREFIX}:{{{topic}}}:"
    return [
        tag + "log",
        tag + "meta",
        tag + "idem",
        tag + "idem-at",
        tag + "lines",
        tag + "lines-at",
    ]


def record_times_key(topic: str) -> str:
    """A sorted set beside the records: when each was written (ms), for the window."""
    return f"{KEY_PREFIX}:{{{topic}}}:idem-at"


# Fields of a stream entry, as lua/append.lua writes them (short names: they are
# stored once per event). The meta hash's fields ("epoch", "trimmed") are only
# ever touched by the Lua scripts.
FIELD_EPOCH = b"ep"
FIELD_KIND = b"k"
FIELD_DATA = b"d"
FIELD_EVENT = b"e"
FIELD_RETRY = b"r"
FIELD_NUMBER = b"n"  # the entry's number in its log (see append.lua)
KIND_JSON = "j"
KIND_TEXT = "t"

TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,200}")
RESERVED_EVENT_PREFIX = "broker."
GAP_EVENT = "broker.gap"
END_EVENT = "broker.end"
"""The last entry of a closed topic's log; streams deliver it, then end."""
POSITION_EVENT = "broker.position"
"""Where a stream stands with no event to deliver (data ``{}``), sent only to a client
that asked (``?positions=true``): its script keeps the id, as EventSource keeps an
``id:`` line with no data, which fires nothing a script can see."""
BEAT_EVENT = "broker.beat"
"""The heartbeat as an event (data: the interval in seconds, no id), sent instead of the
``:`` comment only to a client that asked (``?heartbeat=event``): EventSource hands a
script no comment, so a page could not tell a live idle stream from a dead one."""
DELETED_EVENT = "broker.deleted"
"""A deleted topic's marker entry: never sent as such, streams turn it into a
``deleted`` gap and end. It lingers DELETED_LINGER_MS for every live reader to see."""
DELETED_LINGER_MS = 60_000

# The edge's garbage-collector thresholds (generations 0, 1, 2; CPython's are 700, 10, 10):
# why and what they measured is in api/gc_tuning.py.
GC_THRESHOLDS = (50_000, 20, 20)

# Defaults of the settings (the HTTP edge reads BROKER_* into these).
DEFAULT_RETENTION_MAXLEN = 100_000
DEFAULT_IDEMPOTENCY_SECONDS = 3600
DEFAULT_MAX_EVENT_BYTES = 65_536
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_TOPICS_PER_SUBSCRIPTION = 32
MOST_TOPICS_PER_SUBSCRIPTION = 1000  # the setting's bound (a cursor grows with each topic)
DEFAULT_SUBSCRIBER_BUFFER_BYTES = 1_048_576
DEFAULT_HEARTBEAT_SECONDS = 15.0
DEFAULT_RETRY_MS = 2000
DEFAULT_HEAD_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_HEAD_BYTES = 16_384
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
DEFAULT_MAX_CONNECTIONS = 50_000

# Replays read the log in pages of this many entries, so a subscriber resuming
# from far back never holds the whole history in memory.
REPLAY_PAGE_SIZE = 500
# ... and of at most this many bytes of event data (one event at least): a client that
# stops reading pins one page in the broker (500 events of 60 KB were 60 MB, held for
# as long as the connection stayed open). History pages too (their `next` goes on).
# A replay's pages are also at most half the subscriber's buffer (Subscription), but
# not under this many bytes (each page waits READ_COALESCE_MS for company).
REPLAY_PAGE_MIN_BYTES = 65_536
REPLAY_PAGE_BYTES = 1_048_576
# Identical log reads (a reconnect storm) wait this long for company before
# they go to Redis as one (ms); see single_flight.SingleFlight.
READ_COALESCE_MS = 5
# ... and while company keeps coming in each window, wait again, this long at most
# (ms): a storm arriving over half a second then costs a read per 25 ms, not per 5,
# whatever the speed of the round trip. A read with no company waits one window.
READ_COALESCE_MAX_MS = 25
# The live reader asks for at most this many entries per topic per XREAD.
LIVE_READ_COUNT = 1000
# After a dispatch, the live reader waits this long before reading again, so
# that under load several events share one write per subscriber (ms).
LIVE_LINGER_MS = 10
# A streaming ingest's append waits up to this long for other appends to travel
# with it in one write to Redis (ms): its producer does not wait for it before
# sending more, unlike a POST's client. In `sessions` (500 token streams), -8%
# server CPU and -15% Redis CPU per token, latency unchanged.
STREAMING_APPEND_LINGER_MS = 2
# On a Redis Cluster the live reader polls (see redis_live_cluster.ClusterLiveReader):
# this often while events flow, backing off to the maximum when quiet (ms).
CLUSTER_POLL_MIN_MS = 5
CLUSTER_POLL_MAX_MS = 100
CLUSTER_NODE_POLL_S = 0.5
"""The most a Cluster poll waits for one node: the others' topics go on without it."""
CLUSTER_NODE_STUCK_S = 3.0
"""A node whose read has taken this long has failed (its topics' unread spell begins)."""
CLUSTER_MIGRATION_PATIENCE_S = 2.0
"""How long a topic's command waits out TRYAGAIN while its slot migrates (its keys
split between two nodes; see redis_slots), then a 503. Under the publish deadline
(BROKER_PUBLISH_TIMEOUT_SECONDS, 5 s by default), so the 503 says why."""
CLUSTER_TRYAGAIN_FIRST_PAUSE_S = 0.005
CLUSTER_TRYAGAIN_MAX_PAUSE_S = 0.05
"""The pause before trying again after TRYAGAIN: doubled each time, up to this."""
CLUSTER_HUNG_REPLY_S = 1.0
"""A Cluster command cancelled after awaiting its reply this long (a publish's
deadline: the edges cancel) counts as its node perhaps failed: the slot map is asked
again, so that the publisher's retry reaches a new owner."""
CLUSTER_MAX_REDIRECTS = 16
"""MOVED or ASK answers in a row before a command is refused (redis-py's own bound)."""
# Command connections per Redis server (per Cluster primary), all opened when the
# store opens and kept open: a process holds as many idle as under load. Commands
# beyond them wait for a free one (up to REDIS_POOL_WAIT_SECONDS). Few are needed:
# Redis runs one command at a time, appends travel pipelined on one connection
# and identical reads are coalesced.
REDIS_POOL_SIZE = 8
REDIS_POOL_WAIT_SECONDS = 5.0
# How often a Sentinel store asks the Sentinels where the primary is (seconds): when
# they name another one, every connection to the old one is dropped (redis_primary).
# Measured (a planned SENTINEL FAILOVER, two brokers writing alternately): asked every
# second, live subscribers of the old primary passed 14-15 events the new one kept;
# every quarter second, 0-4. Three Sentinels asked: 12 cheap calls a second.
PRIMARY_WATCH_S = 0.25
# How long a command (an append batch included) waits for Redis's reply before its
# connection is dropped and the command fails as "store unavailable".
REDIS_REPLY_TIMEOUT_SECONDS = 5.0
# How long /readyz/store waits for the store's PING (s).
READY_PING_TIMEOUT_S = 1.0
# Listing topics: SCAN about the page's limit of keys a call (within these bounds),
# at most LIST_SCAN_ROUNDS steps a page (a step that finds more than the page has room
# for is taken again with a quarter of the COUNT, so at most 5 more calls each).
LIST_SCAN_MIN_COUNT = 16
LIST_SCAN_COUNT = 1000
LIST_SCAN_ROUNDS = 20
# A SCAN step split across pages (more topics than a page, even at COUNT 1) has the
# cursor name those its pages showed, at most this many (api/routes.py reads no more):
# past it, the rest of the step goes in one page, past its limit. COUNT 1 takes one
# bucket of Redis's keyspace (and those it grows into mid-rehash): a few keys.
LIST_STEP_SHOWN_MAX = 16
# How long one blocking XREAD waits before it is re-armed anyway (ms); and where
# CLIENT UNBLOCK is refused (an ACL), so that a topic joining a read cannot end it.
LIVE_BLOCK_MS = 5000
LIVE_BLOCK_UNINTERRUPTIBLE_MS = 100
# Added to the time since the live reader's previous read when judging whether
# retention by age could have removed an entry it had not read yet: that entry may
# have been appended up to a round trip before the previous read came back.
LIVE_AWAY_MARGIN_MS = 100
# The live reader spreads its topics over lanes of at most this many, each one
# blocking XREAD on a connection of its own, so that a topic coming (or an event
# waking a read) re-arms one lane, not an XREAD over every live topic: re-arming
# costs in proportion to the keys named (see redis_live.LiveReader). Past
# LIVE_LANES_MAX lanes per Redis server, lanes grow instead.
LIVE_LANE_TOPICS = 128
LIVE_LANES_MAX = 32
# The embedded store frees expired keys this often (s): see RedisStreamStore._sweep_expired.
EMBEDDED_EXPIRY_SWEEP_S = 1.0
# The reader's reconnect backoff while Redis is unreachable (seconds).
# After an outage, how long the live reader waits for the topics' states before it
# reads those that answered (the others join as they answer), and how long before
# it asks again for those whose state failed (a Cluster node still down).
REVALIDATE_WAIT_S = 0.5
REVALIDATE_RETRY_S = 1.0
RECONNECT_BACKOFF_MIN = 0.05
RECONNECT_BACKOFF_MAX = 2.0
# How long a replicated publish waits for a replica to confirm (ms).
REPLICA_CONFIRM_MS = 2000
# Redis's memory limit (broker/redis_checks.py): how often the memory policy is read
# again (s), and the Retry-After of a write refused for want of memory, or because
# Redis may evict (s).
EVICTION_CHECK_S = 30.0
# At start, how long a READONLY Redis is asked again before the broker stops (s): a
# primary endpoint failing over (DNS, a virtual IP) answers it for a moment.
READONLY_AT_START_S = 10.0
READONLY_RETRY_S = 1.0
RIGHTS_RETRY_S = 2.0
"""How often a broker that started with Redis out of reach tries its rights again."""
STORE_FULL_RETRY_AFTER_S = 5
EVICTING_RETRY_AFTER_S = 30
