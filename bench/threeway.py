"""The three-way table: broker, baseline and Nchan, with a broker / Nchan column.

Absolute figures do not carry between machines (the same commit measured 13.3k and 3.5k
publishes/s on two of them); a ratio measured in one run does. So every row gets the
plain quotient broker / Nchan, and the rows issue 13 sets a bound for say whether it is
met. `add_nchan` extends the rows `report.rows` builds, so the JSON holds the same.
"""

from __future__ import annotations

import math
from typing import Any

from bench.report import Results, _number, layout

# (scenario, figure) -> (which way the quotient broker / Nchan must go, the bound).
RATIO_TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("fanout", "cpu_us_per_delivery"): ("<=", 0.8),
    ("fanout", "latency_p99_ms"): ("<=", 1.0),
    ("publish-single", "events_per_s"): (">=", 1.0),
    ("idle", "kb_per_subscriber"): ("<=", 1.0),
    ("broadcast", "latency_p99_ms"): ("<=", 1.0),
    ("broadcast", "cpu_us_per_delivery"): ("<=", 0.8),
}
COLUMNS = (
    "figure", "broker", "baseline", "nchan", "broker vs baseline", "target", "met?",
    "broker / nchan", "ratio target", "ratio met?",
)  # fmt: skip


def _nchan_value(results: Results, scenario: str, key: str) -> float | None:
    value = results.get("nchan", {}).get(scenario, {}).get("figures", {}).get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def _quotient(broker: float | None, nchan: float | None) -> float | None:
    if broker is None or nchan is None or nchan == 0 or broker < 0 or nchan < 0:
        return None
    return broker / nchan


def add_nchan(table: list[dict[str, Any]], results: Results) -> None:
    """Add Nchan's figure, broker / Nchan and the issue's bound on it to every row."""
    for row in table:
        nchan = _nchan_value(results, row["scenario"], row["key"])
        quotient = _quotient(row["broker"], nchan)
        bound = RATIO_TARGETS.get((row["scenario"], row["key"]))
        met = None
        if bound is not None and quotient is not None:
            met = quotient <= bound[1] if bound[0] == "<=" else quotient >= bound[1]
        row |= {
            "nchan": nchan,
            "broker_over_nchan": quotient,
            "nchan_ratio_target": None if bound is None else f"{bound[0]} {bound[1]:g}",
            "nchan_ratio_met": met,
        }


def render(table: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [
        (
            row["figure"],
            _number(row["broker"], row["digits"]),
            (_number(row["baseline"], row["digits"]) + " " + row["baseline_note"]).strip(),
            _number(row["nchan"], row["digits"]),
            row["broker_advantage_text"],
            row["target_text"],
            {True: "yes", False: "NO", None: ""}[row["met"]],
            _number(row["broker_over_nchan"], 2),
            row["nchan_ratio_target"] or "",
            {True: "yes", False: "NO", None: ""}[row["nchan_ratio_met"]],
        )
        for row in table
    ]
    return layout(cells)
