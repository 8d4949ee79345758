"""Python's cyclic garbage collector, set for a process that holds thousands of sockets.

Measured with the bench's `broadcast` (15,000 idle subscribers over 2 workers, 20 events
at 2/s) and `gc.callbacks` timing every collection in each worker: with CPython's
thresholds (700, 10, 10) a worker ran 3-4 full collections during the 10 s broadcast,
each 90-150 ms of CPU (up to 390 ms of wall time on the shared 2-core machine), about
0.45 s of CPU in all, 3 of its ~20 us of CPU per delivery. Each event's burst of
short-lived objects per socket outgrows generation 0 and 1 and is promoted, and a full
collection walks every live object of every connection, stalling every socket of that
worker meanwhile. With generation 0 at 50,000 the young objects of a burst mostly die
before a collection: 6 young collections in the window, 67 ms of CPU, no full one.

`gc.freeze()` once started moves what import and start-up made (about 90,000 objects a
worker, none of them garbage) out of every later collection's walk.
The cost: cyclic garbage that survives to the oldest generation waits longer for a full
collection (after 400 young ones rather than 100).
"""

from __future__ import annotations

import gc

from broker.constants import GC_THRESHOLDS


def tune_gc() -> None:
    """Freeze what start-up made and raise the collection thresholds (see above)."""
    gc.collect()  # what start-up left as garbage goes now, not frozen forever
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
