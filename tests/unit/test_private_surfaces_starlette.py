"""``api.app.AppState``: Starlette's ``State`` whose entries are also plain attributes.

It stays one with ``State`` only while every write goes through the methods it
overrides; pyproject.toml pins Starlette below its next minor release, and these
checks say when ``State`` changed under it.
"""

from __future__ import annotations

import pytest
from starlette.datastructures import State

from api.app import AppState, create_app
from api.settings import Settings

STATE_METHODS = {
    "__init__",
    "__setattr__",
    "__getattr__",
    "__delattr__",
    "__getitem__",
    "__setitem__",
    "__delitem__",
    "__iter__",
    "__len__",
}
"""Starlette 1.10's ``State``: the four writes ``AppState`` follows, and reads."""


def test_starlettes_state_has_no_other_way_to_write_an_entry() -> None:
    own = {name for name, value in vars(State).items() if callable(value)}
    assert own == STATE_METHODS


def test_an_entry_reads_alike_however_it_was_written() -> None:
    state = AppState()
    state.broker = "by attribute"
    state["settings"] = "by item"
    assert (state.broker, state["broker"]) == ("by attribute", "by attribute")
    assert (state.settings, state["settings"]) == ("by item", "by item")
    assert sorted(state) == ["broker", "settings"] and len(state) == 2
    state.broker = "replaced"
    assert (state.broker, state["broker"]) == ("replaced", "replaced")


def test_an_entry_removed_either_way_is_gone_both_ways() -> None:
    state = AppState()
    state.broker, state.settings = 1, 2
    del state.broker
    del state["settings"]
    for name in ("broker", "settings"):
        with pytest.raises(AttributeError):
            getattr(state, name)
        with pytest.raises(KeyError):
            state[name]
        assert getattr(state, name, None) is None
    assert len(state) == 0


def test_the_apps_state_is_one_and_found_without_its_getattr() -> None:
    app = create_app(Settings())
    assert isinstance(app.state, AppState)
    assert vars(app.state)["authorizer"] is app.state["authorizer"]
