"""PNG plots of a summary: metric bars per method, and the sequential retention curve."""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType

from lmscalpel.core.files import atomic_write_bytes
from lmscalpel.evaluation.report import header
from lmscalpel.evaluation.summary import BASELINE, Summary

RATES = ("ES", "PS", "NS", "score", "edit_acc", "exact_match", "locality_unchanged", "portability")
MARKERS = ("o", "s", "^", "D", "v")
LABELS = {"score": "S (h-mean)", "exact_match": "exact match"}
CURVES = (
    ("ES", "efficacy ES"),
    ("PS", "paraphrase PS"),
    ("NS", "neighbourhood NS"),
    ("locality_unchanged", "locality unchanged"),
    ("edit_acc", "edit token accuracy"),
    ("fluency", "fluency (bits)"),
)


def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only backend, imported when a plot is drawn: it costs about
    half a second, which every ``import lmscalpel.evaluation`` (the CLI's error report too) would
    otherwise pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def plot_metrics(summary: Summary, path: str | Path) -> Path:
    """Grouped bars of the rate metrics (in %) per method, beside fluency and seconds per edit."""
    names = list(summary.rows)
    present = {k for row in summary.rows.values() for k in row}
    kinds = sorted(k for k in present if k.startswith("portability/"))
    rates = [k for k in RATES if k in present] + (kinds if len(kinds) > 1 else [])
    side = [k for k in ("fluency", "seconds_per_edit") if k in present]
    many = len(names) > 4
    widths = [max(4.0, 0.9 * len(rates))] + [max(1.6, 0.32 * len(names))] * len(side)
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, 1 + len(side), figsize=(sum(widths) + 1.5, 4.2),
        gridspec_kw={"width_ratios": widths}, squeeze=False,
    )  # fmt: skip
    axes = axes[0]
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(names))
    ax = axes[0]
    for i, name in enumerate(names):
        row = summary.rows[name]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rates))]
        values = [100 * row[k] if k in row else 0.0 for k in rates]
        bars = ax.bar(
            xs,
            values,
            width,
            label=name,
            color=colours(i),
            alpha=0.55 if name == BASELINE else 0.95,
        )
        if len(names) * len(rates) <= 40:
            for bar, k in zip(bars, rates):
                ax.annotate(
                    f"{100 * row[k]:.0f}" if k in row else "n/a",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7 if len(names) < 3 else 6,
                    rotation=0 if len(names) < 3 else 90,
                    color="black" if k in row else "grey",
                )
    ax.set_xticks(range(len(rates)))
    ax.set_xticklabels([LABELS.get(k, header(k)) for k in rates], rotation=30, ha="right")
    ax.set_ylim(0, 140 if many else 124)  # room for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.set_title(f"{summary.protocol} protocol, {summary.n_cases} cases")
    ax.legend(fontsize=8, loc="upper center", ncol=(len(names) + 1) // 2 if many else len(names),
              frameon=False)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    for ax, key in zip(axes[1:], side):
        shown = [n for n in names if key in summary.rows[n]]
        values = [summary.rows[n][key] for n in shown]
        for x, n in enumerate(shown):
            ax.bar(
                x,
                summary.rows[n][key],
                color=colours(names.index(n)),
                alpha=0.55 if n == BASELINE else 0.95,
            )
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=30, ha="right")
        ax.set_title("fluency (bits)" if key == "fluency" else "seconds per edit")
        for x, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=6 if many else 7,
                        rotation=90 if many else 0)  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.25 if many else 0.15)
    _save(fig, Path(path))
    return Path(path)


def plot_retention(summary: Summary, path: str | Path) -> Path:
    """Sequential protocol: each metric of all earlier edits against the number of edits made,
    one line per method, the unedited model dashed."""
    present = {k for curve in summary.retention.values() for p in curve for k in p}
    panels = [(k, t) for k, t in CURVES if k in present]
    cols = min(3, len(panels)) or 1
    rows = (len(panels) + cols - 1) // cols or 1
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    most = max((p["edits"] for c in summary.retention.values() for p in c), default=1)
    for n, (key, title) in enumerate(panels):
        ax = axes[n // cols][n % cols]
        for i, (name, curve) in enumerate(summary.retention.items()):
            points = [(p["edits"], p[key]) for p in curve if key in p]
            scale = 1.0 if key == "fluency" else 100.0
            ax.plot(
                [x for x, _ in points],
                [scale * y for _, y in points],
                marker=MARKERS[i % len(MARKERS)],
                markersize=7 - 1.5 * (i % 3),
                linestyle=("-", "--", ":")[i % 3],
                label=name,
                color=colours(i + 1),
            )
        base = summary.rows.get(BASELINE, {})
        if key in base:
            scale = 1.0 if key == "fluency" else 100.0
            ax.axhline(scale * base[key], color="grey", linestyle="--", label=BASELINE)
        if most >= 10:
            ax.set_xscale("log")
        ticks = sorted({p["edits"] for c in summary.retention.values() for p in c})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("edits made")
        ax.set_ylabel("bits" if key == "fluency" else "%")
        if key != "fluency":
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for n in range(len(panels), rows * cols):
        axes[n // cols][n % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Retention of earlier edits (sequential editing)")
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)
