"""The README's settings tables (Configuration, Security) name every setting of
``api/settings.py`` with its default, and no setting the broker does not have: a
variable missing there is one nobody knows to set, and one named there that the
broker lacks stops it at start (unknown settings fail closed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from api.settings import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(BROKER_[A-Z_]+)` \| ([^|]*) \|", re.MULTILINE)
NO_VALUE = {"unset": None, "empty": "", "`[]`": []}


def readme_defaults() -> dict[str, Any]:
    """Each table row's variable and its default, as the value the setting holds."""
    return {name: _value(shown.strip()) for name, shown in ROW.findall(README.read_text())}


def _value(shown: str) -> Any:
    if shown in NO_VALUE:
        return NO_VALUE[shown]
    text = shown.strip("`")
    return {"true": True, "false": False}.get(text, text)


def code_defaults() -> dict[str, Any]:
    return {
        f"{ENV_PREFIX}{name.upper()}": field.get_default(call_default_factory=True)
        for name, field in Settings.model_fields.items()
    }


def _same(shown: Any, default: Any) -> bool:
    if isinstance(default, int | float) and not isinstance(default, bool):
        return isinstance(shown, str) and float(shown) == default
    return bool(shown == default)


def test_every_setting_is_in_the_readme_and_every_row_is_a_setting() -> None:
    shown, code = readme_defaults(), code_defaults()
    assert sorted(code.keys() - shown.keys()) == [], "settings the README does not list"
    assert sorted(shown.keys() - code.keys()) == [], "README rows that are no setting"


def test_the_readme_gives_each_settings_default() -> None:
    shown, code = readme_defaults(), code_defaults()
    wrong = {name: (shown[name], code[name]) for name in code if not _same(shown[name], code[name])}
    assert wrong == {}, "README default, code default"
