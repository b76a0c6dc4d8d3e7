"""PNG plots of a summary: metric bars per method, and the sequential retention curves (several
methods on one plot); :func:`plot_curves` draws any metric-against-x curves the same way (a
benchmark's metrics against the batch size)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
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
    ("seconds_per_edit", "seconds per edit"),
)
UNITS = {"fluency": "bits", "seconds_per_edit": "s"}  # the other curves are rates, in %


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
    one line per method (several methods on one plot), the unedited model dashed."""
    size = summary.batch_size
    per_call = f", {size} per editor call" if size and size > 1 else ""
    return plot_curves(
        summary.retention,
        path,
        baseline=summary.rows.get(BASELINE),
        title=f"Retention of earlier edits (sequential editing{per_call})",
    )


def plot_curves(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    *,
    x: str = "edits",
    xlabel: str = "edits made",
    title: str = "",
    baseline: Mapping[str, float] | None = None,
) -> Path:
    """One panel per metric of :data:`CURVES` that some point has (ES, PS, NS, locality, edit
    accuracy, fluency, seconds per edit), each with one line per entry of ``curves`` (points ``{x: ..., metric:
    ...}``), a log x axis once it spans a decade, and ``baseline``'s value dashed."""
    present = {k for curve in curves.values() for p in curve for k in p}
    panels = [(k, t) for k, t in CURVES if k in present]
    cols = min(3, len(panels)) or 1
    rows = (len(panels) + cols - 1) // cols or 1
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    xs_all = sorted({p[x] for c in curves.values() for p in c})
    for n, (key, panel_title) in enumerate(panels):
        ax = axes[n // cols][n % cols]
        scale = 1.0 if key in UNITS else 100.0
        for i, (name, curve) in enumerate(curves.items()):
            points = sorted((p[x], p[key]) for p in curve if key in p)
            ax.plot(
                [a for a, _ in points],
                [scale * b for _, b in points],
                marker=MARKERS[i % len(MARKERS)],
                markersize=7 - 1.5 * (i % 3),
                linestyle=("-", "--", ":")[i % 3],
                label=name,
                color=colours(i + 1),
            )
        if baseline and key in baseline:
            ax.axhline(scale * baseline[key], color="grey", linestyle="--", label=BASELINE)
        if xs_all and xs_all[-1] >= 10 * max(1, xs_all[0]):
            ax.set_xscale("log")
        if len(xs_all) <= 12:
            ax.set_xticks(xs_all)
            ax.set_xticklabels([str(t) for t in xs_all], rotation=45 if len(xs_all) > 6 else 0)
            ax.minorticks_off()
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(UNITS.get(key, "%"))
        if key not in UNITS:
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for n in range(len(panels), rows * cols):
        axes[n // cols][n % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)
