"""Matplotlib figures (PNG) for MLflow and the eval outputs.

matplotlib is imported inside each function with the Agg backend, so importing this
module costs nothing and needs no display. Every function takes plain data and the PNG
path to write (written atomically), and returns that path, or None when there is nothing to plot.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

from tnd.io import atomic_write_bytes

# Training-curve panels: (title, columns of plots/train.csv drawn in it).
TRAIN_PANELS = (
    ("reward", ("env/reward_mean",)),
    ("KL to reference", ("objective/kl",)),
    ("KL coefficient", ("objective/kl_coef",)),
    ("losses", ("loss/policy", "loss/value", "loss/distill")),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def training_curves(rows: Sequence[Mapping], path: str | Path) -> Path | None:
    """Reward, KL, KL coefficient and losses vs step, from rows of plots/train.csv (strings or numbers)."""
    if not rows or "step" not in rows[0]:
        return None
    panels = [(title, [c for c in cols if c in rows[0]]) for title, cols in TRAIN_PANELS]
    panels = [(title, cols) for title, cols in panels if cols]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    steps = [_number(row["step"]) for row in rows]
    for ax, (title, cols) in zip(axes[0], panels):
        for col in cols:
            ax.plot(steps, [_number(row[col]) for row in rows], label=col)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(cols) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def model_comparison(metrics: Mapping[str, Mapping], keys: Sequence[str], path: str | Path) -> Path | None:
    """One bar panel per metric key, one bar per model (null metrics are left out)."""
    keys = [k for k in keys if any(isinstance(m.get(k), (int, float)) for m in metrics.values())]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(len(keys), 5)
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    names = list(metrics)
    colours = [f"C{i}" for i in range(len(names))]
    for ax, key in zip(axes.flat, keys):
        values = [metrics[name].get(key) for name in names]
        ax.bar(range(len(names)), [v if isinstance(v, (int, float)) else 0.0 for v in values], color=colours)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def word_surprisal(rows: Sequence[Mapping], models: Sequence[str], path: str | Path) -> Path | None:
    """Mean surprisal per word category and model (bars), and per word: each model vs the first (scatter).

    rows: {"word", "category", "count", <model>: bits, ...} as in plots/eval_word_surprisal.csv.
    """
    if not rows or not models:
        return None
    plt = _pyplot()
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(10, 3.8))
    categories = sorted({row["category"] for row in rows})
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        means = []
        for category in categories:
            values = [_number(r[model]) for r in rows if r["category"] == category]
            values = [v for v in values if math.isfinite(v)]
            means.append(sum(values) / len(values) if values else 0.0)
        bars.bar([c + i * width for c in range(len(categories))], means, width, label=model)
    bars.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, fontsize=8)
    bars.set_ylabel("mean surprisal (bits)")
    bars.set_title("word surprisal by category")
    bars.legend(fontsize=7)
    base = models[0]
    xs = [_number(r[base]) for r in rows]
    for model in models[1:]:
        scatter.scatter(xs, [_number(r[model]) for r in rows], s=8, alpha=0.6, label=model)
    finite = [v for r in rows for m in models if math.isfinite(v := _number(r[m]))]
    if finite:
        lo, hi = min(finite), max(finite)
        scatter.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    scatter.set_xlabel(f"{base} (bits)")
    scatter.set_ylabel("other model (bits)")
    scatter.set_title("per-word surprisal")
    if len(models) > 1:
        scatter.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def word_curve(rows: Sequence[Mapping], words: Sequence[str], path: str | Path) -> Path | None:
    """Surprisal (bits) vs PPO step: the mean over words (thick) and each of `words`.

    rows: {"step", "mean", "word:<word>": bits, ...} as in plots/eval_word_curve.csv.
    """
    if len(rows) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    steps = [_number(row["step"]) for row in rows]
    ax.plot(steps, [_number(row["mean"]) for row in rows], color="black", linewidth=2.5, label="mean")
    for word in words:
        ax.plot(steps, [_number(row.get(f"word:{word}")) for row in rows], linewidth=1, marker=".", label=word)
    ax.set_xscale("symlog", linthresh=1)  # log-spaced snapshots (ppo.snapshot_schedule: log); step 0 still shows
    ax.set_xlabel("PPO step")
    ax.set_ylabel("surprisal (bits)")
    ax.set_title("word acquisition: surprisal of the student over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def naoa(
    thresholds: Sequence[float], groups: Mapping[str, Mapping], examples: Sequence[Mapping], path: str | Path
) -> Path | None:
    """Left: mean nAoA (log10 student update) against the threshold, one line per group ("overall" thick).
    Right: a few words' surprisal against log10 step (dots), their fitted sigmoids, the initial
    value (dashed) and nAoA@0.5 on the fit (cross).

    groups: {name: [nAoA or None, one per threshold]}; examples: [{"word",
    "initial", "points": [(step, bits)], "fitted": [(step, bits)], "marker": (log10 step, bits) or None}].
    """
    lines = {name: [_number(value) for value in values] for name, values in groups.items()}
    lines = {name: ys for name, ys in lines.items() if any(math.isfinite(y) for y in ys)}
    if not lines and not examples:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, ys in lines.items():
        left.plot(thresholds, ys, marker="o", linewidth=2.5 if name == "overall" else 1,
                  color="black" if name == "overall" else None, label=name)
    left.set_xlabel("threshold (fraction of the way: eval.naoa_scale)")
    left.set_ylabel("nAoA (log10 student update)")
    left.set_title("age of acquisition by word category")
    if lines:
        left.legend(fontsize=7)
    for i, example in enumerate(examples):
        colour = f"C{i}"
        right.scatter([math.log10(s) for s, _ in example["points"]], [v for _, v in example["points"]], s=10,
                      color=colour, label=example["word"])
        right.plot([math.log10(s) for s, _ in example["fitted"]], [v for _, v in example["fitted"]], color=colour,
                   linewidth=1)
        right.axhline(example["initial"], color=colour, linewidth=0.6, linestyle="--")
        if example.get("marker") is not None:
            right.scatter(*example["marker"], marker="x", s=40, color=colour)
    right.set_xlabel("log10 student update")
    right.set_ylabel("surprisal (bits)")
    right.set_title("fitted acquisition curves (x: nAoA@0.5)")
    if examples:
        right.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def curves_by_mode(lines: Mapping[str, Sequence[tuple[float, float]]], ylabel: str, title: str,
                   path: str | Path) -> Path | None:
    """One line per run or mode: lines {name: [(student updates, value)]} (log x-axis from 1 update)."""
    lines = {name: [(x, _number(y)) for x, y in points if x >= 1] for name, points in lines.items()}
    lines = {name: points for name, points in lines.items() if points}
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, points in lines.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker=".", linewidth=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("student updates (PPO and LM optimizer steps)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def effective_vocabulary(lines: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path | None:
    """The paper's effective vocabulary: words acquired (half-way from chance to the teacher) vs updates."""
    return curves_by_mode(lines, "words acquired", "effective vocabulary", path)


def practice(rows: Sequence[Mapping], summary: Mapping, path: str | Path) -> Path | None:
    """The paper's "practice makes perfect": per word, its count in the student's trials (log10 of 1 + it) against
    its final surprisal and its nAoA@0.5, one colour per category; the rank correlations in the titles.

    rows: {"word", "category", "trained_count", "surprisal", "naoa_t50"} as in plots/eval_practice.csv.
    """
    if not rows:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(1, 2, figsize=(10, 3.8))
    for panel, key, label in zip(panels, ("surprisal", "naoa_t50"), ("final surprisal (bits)", "nAoA@0.5 (log10 step)")):
        for category in sorted({row["category"] for row in rows}):
            points = [(math.log10(row["trained_count"] + 1), _number(row[key])) for row in rows if row["category"] == category]
            points = [(x, y) for x, y in points if math.isfinite(y)]
            panel.scatter([x for x, _ in points], [y for _, y in points], s=10, alpha=0.6, label=category)
        panel.set_xlabel("log10(count in the student's trials + 1)")
        panel.set_ylabel(label)
        rho = summary.get(f"spearman_{key}")
        panel.set_title(f"Spearman rho {rho:.2f}" if rho is not None else "Spearman rho: too few words")
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
