"""Pictures of causal traces: per-prompt heatmaps (the paper's Figure 1) and aggregate curves.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT", Figures 1 and 2. Figures are
built with matplotlib's object API (no pyplot, no display needed) and written as PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lmscalpel.locate.result import TraceResult

COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLORS = {"hidden": "#6a51a3", "mlp": "#238b45", "attn": "#cb181d"}
TITLES = {
    "hidden": "Impact of restoring state after corrupted input",
    "mlp": "Impact of restoring MLP after corrupted input",
    "attn": "Impact of restoring attention after corrupted input",
}


def layer_label(kind: str, window: int) -> str:
    if kind == "hidden" or window == 1:
        what = {"hidden": "single restored layer", "mlp": "restored MLP layer"}.get(
            kind, "restored attention layer"
        )
        return what
    part = "MLP" if kind == "mlp" else "attention"
    return f"centre of interval of {window} restored {part} layers"


def token_labels(result: TraceResult) -> list[str]:
    """Decoded tokens, with the subject's marked ``*`` as in the paper."""
    subject = set(result.subject_positions)
    return [f"{tok!r}*" if i in subject else repr(tok) for i, tok in enumerate(result.tokens)]


def _draw_heatmap(fig: Figure, ax, result: TraceResult, kind: str) -> None:
    values = result.restored[kind].float().numpy()
    n_tokens, n_layers = values.shape
    low = result.p_corrupted
    high = max(result.p_clean, float(torch.nan_to_num(result.restored[kind], nan=low).max()))
    image = ax.imshow(
        values,
        cmap=COLORMAPS[kind],
        vmin=low,
        vmax=high if high > low else low + 1e-6,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_yticks(range(n_tokens))
    ax.set_yticklabels(token_labels(result), fontsize=8)
    step = max(1, math.ceil(n_layers / 10 / 5) * 5) if n_layers > 12 else 1
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xlabel(layer_label(kind, result.window))
    ax.set_title(TITLES[kind], fontsize=10)
    first, last = result.subject_positions[0], result.subject_positions[-1]
    ax.add_patch(
        Rectangle((-0.5, first - 0.5), n_layers, last - first + 1, fill=False, ec="0.35", lw=0.8)
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(f"p({result.answer.strip()!r})", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def plot_trace(result: TraceResult, kind: str, path: str | Path) -> Path:
    """One heatmap: tokens down (subject marked ``*``), layers across, colour = P_restored from
    P_corrupted (white) up to P_clean."""
    n_tokens = len(result.tokens)
    fig = Figure(figsize=(6.4, 1.5 + 0.28 * n_tokens), layout="constrained")
    ax = fig.add_subplot()
    _draw_heatmap(fig, ax, result, kind)
    fig.suptitle(_caption(result), fontsize=8)
    fig.savefig(path, dpi=150)
    return Path(path)


def plot_traces(result: TraceResult, path: str | Path) -> Path:
    """The traced kinds side by side, as in the paper's Figure 1."""
    kinds = result.kinds
    n_tokens = len(result.tokens)
    fig = Figure(figsize=(5.2 * len(kinds), 1.5 + 0.28 * n_tokens), layout="constrained")
    for index, kind in enumerate(kinds):
        _draw_heatmap(fig, fig.add_subplot(1, len(kinds), index + 1), result, kind)
    fig.suptitle(_caption(result), fontsize=9)
    fig.savefig(path, dpi=150)
    return Path(path)


def _caption(result: TraceResult) -> str:
    return (
        f"{result.model}: {result.prompt!r} -> {result.answer.strip()!r}\n"
        f"P_clean={result.p_clean:.3f}  P_corrupted={result.p_corrupted:.3f}  "
        f"(noise sigma {result.noise:.3g}, {result.samples} samples)"
    )


def plot_layer_curves(
    means: dict[str, Sequence[float]],
    errors: dict[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    window: int,
    peak: int | None = None,
) -> Path:
    """Average indirect effect per layer for each kind (shaded: one standard error), with the
    MLP peak marked."""
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for kind, mean in means.items():
        mean_t = torch.tensor(mean, dtype=torch.float64)
        err = torch.tensor(errors[kind], dtype=torch.float64)
        layers = range(len(mean_t))
        label = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}[kind]
        if kind != "hidden" and window > 1:
            label += f" (window {window})"
        ax.plot(layers, mean_t.numpy(), color=COLORS[kind], label=label, lw=1.8)
        ax.fill_between(
            layers, (mean_t - err).numpy(), (mean_t + err).numpy(), color=COLORS[kind], alpha=0.2
        )
    if peak is not None:
        ax.axvline(peak, color=COLORS["mlp"], ls="--", lw=1)
        ax.annotate(
            f"MLP peak: layer {peak}",
            (peak, ax.get_ylim()[1]),
            xytext=(4, -12),
            textcoords="offset points",
            color=COLORS["mlp"],
            fontsize=9,
        )
    ax.axhline(0, color="0.7", lw=0.8)
    if window > 1 and set(means) - {"hidden"}:
        ax.set_xlabel(f"layer (for MLP and attention: centre of the {window} restored layers)")
    else:
        ax.set_xlabel("layer")
    ax.set_ylabel("average indirect effect on p(answer)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=150)
    return Path(path)


def plot_token_classes(
    classes: dict[str, dict[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    window: int,
) -> Path:
    """Average indirect effect per token class (rows) and layer (columns), one panel per kind:
    the paper's Figure 2 layout. ``classes[kind][class_name]`` is a per-layer list."""
    kinds = list(classes)
    # classes no fact had a traced token of (``None``) are left out
    names = [
        name
        for name in next(iter(classes.values()))
        if any(classes[kind][name] is not None for kind in kinds)
    ]
    fig = Figure(figsize=(5.0 * len(kinds), 3.2), layout="constrained")
    for index, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), index + 1)
        width = len(next(v for v in classes[kind].values() if v is not None))
        values = torch.tensor(
            [classes[kind][n] or [float("nan")] * width for n in names], dtype=torch.float64
        )
        top = float(torch.nan_to_num(values, nan=0.0).max())
        image = ax.imshow(
            values.numpy(),
            cmap=COLORMAPS[kind],
            vmin=0.0,
            vmax=top if top > 0 else 1e-6,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if index == 0 else [], fontsize=8)
        ax.set_xlabel(layer_label(kind, window), fontsize=8)
        ax.set_title(f"Average indirect effect: {kind}", fontsize=9)
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=150)
    return Path(path)
