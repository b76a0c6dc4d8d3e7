"""Summaries as tables: markdown for files, rich for the terminal.

Rates, accuracies and probability margins are shown in percent (as in the ROME and EasyEdit
papers), fluency in bits, time in seconds per edit and memory in MiB. A value a row cannot have
(locality-as-unchanged for the unedited model) is shown as "—".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rich.table import Table

from lmscalpel.evaluation.aggregate import BASELINE


class Tabulated(Protocol):
    """What the tables read of a :class:`~lmscalpel.evaluation.summary.Summary` (which renders
    itself with them, so this module cannot import it)."""

    rows: dict[str, dict[str, float]]
    protocol: str
    n_cases: int
    retention: dict[str, list[dict[str, float]]]
    batch_size: int | None


ORDER = (
    "n_cases",
    "ES", "PS", "NS", "score", "EM", "PM", "NM",
    "edit_acc", "paraphrase_acc", "exact_match", "paraphrase_exact_match",
    "locality_unchanged", "portability", "portability_exact_match", "fluency",
    "seconds_per_edit", "peak_memory_mb", "memory_overhead_mb", "n_edits",
)  # fmt: skip
HEADERS = {
    "n_cases": "n",
    "score": "S",
    "edit_acc": "edit acc",
    "paraphrase_acc": "para acc",
    "exact_match": "exact",
    "paraphrase_exact_match": "para exact",
    "locality_unchanged": "loc same",
    "portability": "port",
    "portability_exact_match": "port exact",
    "seconds_per_edit": "s/edit",
    "peak_memory_mb": "peak MiB",
    "memory_overhead_mb": "+MiB",
    "n_edits": "edits",
}
TERMINAL = (
    "n_cases", "ES", "PS", "NS", "score", "EM", "edit_acc", "exact_match",
    "locality_unchanged", "portability", "fluency", "seconds_per_edit", "peak_memory_mb",
)  # fmt: skip
RAW = {"n_cases", "n_edits", "fluency", "seconds_per_edit", "peak_memory_mb", "memory_overhead_mb"}


def header(key: str) -> str:
    if key in HEADERS:
        return HEADERS[key]
    if key.startswith("portability_exact_match/"):
        return "port exact " + key.split("/", 1)[1]
    if key.startswith("portability/"):
        return "port " + key.split("/", 1)[1]
    if key.startswith("locality_unchanged/"):
        return "loc same " + key.split("/", 1)[1]
    return key


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key in ("n_cases", "n_edits"):
        return str(int(value))
    if key in ("peak_memory_mb", "memory_overhead_mb"):
        return f"{value:.0f}"
    if key == "seconds_per_edit":
        return f"{value:.2f}"
    if key == "fluency":
        return f"{value:.2f}"
    return f"{100 * value:.1f}"


def columns(summary: Tabulated, wanted: Sequence[str] | None = None) -> list[str]:
    """The columns some row has, in a fixed order (per-kind breakdowns after their totals)."""
    present = {k for row in summary.rows.values() for k in row}
    if wanted is not None:
        chosen = [k for k in wanted if k in present]
        kinds = sorted(k for k in present if k.startswith("portability/"))
        if "portability" in chosen and len(kinds) > 1:
            at = chosen.index("portability") + 1
            chosen[at:at] = kinds
        return chosen
    ordered = [k for k in ORDER if k in present]
    extra = sorted(present - set(ordered))
    for total in ("locality_unchanged", "portability", "portability_exact_match"):
        if total in ordered:
            at = ordered.index(total) + 1
            mine = [k for k in extra if k.startswith(total + "/")]
            ordered[at:at] = mine
            extra = [k for k in extra if k not in mine]
    return ordered + extra


def describe(summary: Tabulated) -> str:
    """ "sequential protocol, 100 cases per editor call, 2000 cases" and the like."""
    size = summary.batch_size
    per_call = ""
    if summary.protocol != "single" and size is not None:
        per_call = f", {size} case{'s' if size != 1 else ''} per editor call"
    return f"{summary.protocol} protocol{per_call}, {summary.n_cases} cases"


def markdown_table(summary: Tabulated) -> str:
    """All columns, one row per method (the unedited baseline first), with a legend."""
    keys = columns(summary)
    what = describe(summary)
    lines = [
        f"{what[0].upper()}{what[1:]}. Rates and margins in %, "
        "fluency in bits, time in s per edit (editing only), memory in MiB (peak while editing).",
        "",
        "| method | " + " | ".join(header(k) for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, row in summary.rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(k, row.get(k)) for k in keys) + " |")
    if summary.retention:
        lines += ["", retention_tables(summary)]
    return "\n".join(lines).rstrip() + "\n"


def retention_tables(summary: Tabulated) -> str:
    """The sequential protocol's retention curves, one markdown table per method (the unedited
    model on all cases as the row of 0 edits)."""
    lines = ["Retention (all earlier edits re-measured after k edits; 0: the unedited model on "
             "all cases):", ""]  # fmt: skip
    base = summary.rows.get(BASELINE, {})
    for name, curve in summary.retention.items():
        keys = [
            k
            for k in ("ES", "PS", "NS", "edit_acc", "locality_unchanged", "fluency")
            if any(k in p for p in curve)
        ]
        lines += [
            f"**{name}**",
            "",
            "| edits | " + " | ".join(header(k) for k in keys) + " |",
            "|---:|" + "---:|" * len(keys),
        ]
        if base:
            lines.append("| 0 | " + " | ".join(fmt(k, base.get(k)) for k in keys) + " |")
        for point in curve:
            cells = " | ".join(fmt(k, point.get(k)) for k in keys)
            lines.append(f"| {point['edits']} | {cells} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def console_table(summary: Tabulated, title: str | None = None) -> Table:
    """The main columns for a terminal (the full set is in table.md and summary.json)."""
    keys = columns(summary, TERMINAL)
    table = Table(title=title or f"{describe(summary)} (rates in %, fluency in bits)")
    table.add_column("method")
    for key in keys:
        table.add_column(header(key), justify="right")
    for name, row in summary.rows.items():
        table.add_row(
            name, *(fmt(k, row.get(k)) for k in keys), style="dim" if name == BASELINE else None
        )
    return table
