"""The results table (figure | broker | baseline | ratio | target | met?) and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.config import AUTH_FIGURES, AUTH_TOLERANCE, FIGURES, NOT_FOR_NCHAN, Figure

Results = dict[str, dict[str, dict[str, Any]]]  # target -> scenario -> outcome as a dict
COLUMNS = ("figure", "broker", "baseline", "broker vs baseline", "target", "met?")


def _value(results: Results, target: str, figure: Figure) -> float | None:
    value = results.get(target, {}).get(figure.scenario, {}).get("figures", {}).get(figure.key)
    return None if value is None or not math.isfinite(value) else float(value)


def advantage(figure: Figure, broker: float | None, baseline: float | None) -> float | None:
    """How many times better the broker is than the baseline on this figure (>1 = better)."""
    if broker is None or baseline is None or broker < 0 or baseline < 0:
        return None  # a negative figure (memory given back) has no meaningful ratio
    better, worse = (broker, baseline) if figure.better == "higher" else (baseline, broker)
    if worse == 0:
        return None if better == 0 else math.inf
    return better / worse


def rows(results: Results, sizes_note: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """One row per figure of every scenario that ran, for both the table and the JSON."""
    table = []
    ran = {scenario for outcomes in results.values() for scenario in outcomes}
    for figure in FIGURES:
        if figure.scenario not in ran:
            continue
        broker, baseline = _value(results, "broker", figure), _value(results, "baseline", figure)
        ratio = advantage(figure, broker, baseline)
        table.append(
            {
                "figure": figure.label,
                "scenario": figure.scenario,
                "key": figure.key,
                "better": figure.better,
                "broker": broker,
                "baseline": baseline,
                "baseline_note": sizes_note.get("baseline", {}).get(figure.scenario, ""),
                "broker_advantage": None if ratio is None or math.isinf(ratio) else ratio,
                "broker_advantage_text": _ratio_text(ratio),
                "target": figure.target,
                "target_text": figure.target_text(),
                "met": None if broker is None else figure.met(broker),
                "digits": figure.digits,
                "baseline_measured": figure.baseline,
                "nchan_measured": figure.nchan and figure.scenario not in NOT_FOR_NCHAN,
            }
        )
    return table


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if math.isinf(ratio):
        return "inf x better"
    if ratio >= 1:
        return f"{ratio:,.1f}x better"
    return f"{1 / ratio:,.1f}x worse"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_table(table: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [
        (
            row["figure"],
            _number(row["broker"], row["digits"]),
            (_number(row["baseline"], row["digits"]) + " " + row["baseline_note"]).strip(),
            row["broker_advantage_text"],
            row["target_text"],
            {True: "yes", False: "NO", None: ""}[row["met"]],
        )
        for row in table
    ]
    return layout(cells)


def layout(cells: list[tuple[str, ...]]) -> str:
    """Rows of text cells (the first one the header) as an aligned table: the first
    column to the left, the figures to the right, a rule under the header."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = [
        " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def auth_rows(results: Results) -> list[dict[str, Any]]:
    """Auth on against auth off, for the figures the issue bounds (within 10%)."""
    if "broker-auth" not in results:
        return []
    table = []
    for figure in AUTH_FIGURES:
        off, on = _value(results, "broker", figure), _value(results, "broker-auth", figure)
        if off is None or on is None:
            continue
        ratio = on / off if off else None
        within = None
        if ratio is not None:
            limit = 1 - AUTH_TOLERANCE if figure.better == "higher" else 1 + AUTH_TOLERANCE
            within = ratio >= limit if figure.better == "higher" else ratio <= limit
        table.append(
            {"figure": figure.label, "auth_off": off, "auth_on": on, "on_vs_off": ratio,
             "within_10pct": within, "digits": figure.digits}
        )  # fmt: skip
    return table


def render_auth_table(table: list[dict[str, Any]]) -> str:
    header = ("figure", "auth off", "auth on (HS256)", "on / off", "within 10%?")
    cells = [header] + [
        (
            row["figure"],
            _number(row["auth_off"], row["digits"]),
            _number(row["auth_on"], row["digits"]),
            _number(row["on_vs_off"], 3),
            {True: "yes", False: "NO", None: ""}[row["within_10pct"]],
        )
        for row in table
    ]
    return layout(cells)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n")
