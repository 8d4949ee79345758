"""The edge tunes Python's garbage collector once started (api/gc_tuning.py: measured on the
bench's broadcast), and leaves CPython's defaults with BROKER_GC_TUNING=false."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from api.app import create_app
from api.settings import Settings
from broker.constants import GC_THRESHOLDS


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """The test process's collector as it was, whatever the app did to it."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def test_started_app_freezes_start_up_objects_and_raises_thresholds(
    restored_gc: None,
) -> None:
    gc.unfreeze()
    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0


async def test_gc_tuning_off_keeps_the_defaults(restored_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    app = create_app(Settings(gc_tuning=False))
    async with app.router.lifespan_context(app):
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
