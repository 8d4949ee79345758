"""`--gc-compare`: the broker once more with CPython's garbage-collector defaults
(BROKER_GC_TUNING=false), right after the broker as it ships, so one run shows what
api/gc_tuning.py buys (in the JSON, under the target `broker-gc-default`)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.servers import Target


@dataclass(frozen=True)
class GcDefaultTarget(Target):
    def environment(self, redis_url: str) -> dict[str, str]:
        return super().environment(redis_url) | {"BROKER_GC_TUNING": "false"}


BROKER_GC_DEFAULT = GcDefaultTarget("broker-gc-default", "broker, CPython's GC defaults")
