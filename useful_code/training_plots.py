"""Plots a training run leaves beside its checkpoint: loss and accuracy curves from the Trainer's log_history
(curves.png), and the held-out chosen/rejected rewards with their margins (rewards.png)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

# The Trainer logs training accuracy under either name, depending on who computes it (our loss or TRL's).
TRAIN_ACCURACY_KEYS = ("accuracy", "rewards/accuracies")


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: training runs on servers without a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    """Save a matplotlib figure as PNG beside path, then move into place: an interrupted run never leaves a truncated image."""
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, target)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return str(target)


def _series(log_history: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the entries logging key at a step; non-numeric and non-finite values are left out."""
    points = [(e["step"], e[key]) for e in log_history
              if isinstance(e.get(key), (int, float)) and isinstance(e.get("step"), (int, float))
              and math.isfinite(e[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(log_history: list[dict], path) -> Optional[str]:
    """Write loss (train, eval) and accuracy (train if logged, eval) against the step to path; return path, or
    None (write nothing, and say so) when log_history holds no point to draw."""
    train_acc = next((k for k in TRAIN_ACCURACY_KEYS if _series(log_history, k)[0]), TRAIN_ACCURACY_KEYS[0])
    panels = []
    for label, keys in (("loss", ("loss", "eval_loss")), ("accuracy", (train_acc, "eval_accuracy"))):
        lines = [(name, *_series(log_history, key)) for name, key in zip(("train", "eval"), keys)]
        lines = [line for line in lines if line[1]]
        if lines:  # an empty panel says nothing: leave it out
            panels.append((label, lines))
    if not panels:
        print(f"note: {Path(path).name} not written: the run logged no loss or accuracy to draw (it ran fewer steps "
              "than --logging_steps, and evaluated none)")
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, lines) in zip(axes[0], panels):
        for name, steps, values in lines:
            # Eval points are few (one per eval_every_steps): markers keep a single one visible.
            ax.plot(steps, values, "o-" if name == "eval" else "-", markersize=4, label=f"{name} {label}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    steps = max(e["step"] for e in log_history if isinstance(e.get("step"), (int, float)))
    fig.suptitle(f"Training curves ({steps:g} steps)")
    return save_figure(fig, path)


def plot_rewards(chosen, rejected, path) -> str:
    """Write histograms of held-out chosen and rejected rewards (shared bins) and of their margins to path; return
    path. The share of margins above 0 is the pair accuracy (ties count as wrong, as in training's metric)."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64).ravel(), np.asarray(rejected, dtype=np.float64).ravel()
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen rewards but {len(rejected)} rejected: they must come in pairs")
    if len(chosen) == 0:
        raise ValueError("no held-out rewards to plot")
    bad = int(np.sum(~np.isfinite(chosen)) + np.sum(~np.isfinite(rejected)))
    if bad:
        raise ValueError(f"{bad} of the {2 * len(chosen)} rewards are NaN or infinite: the model diverged")
    margins = chosen - rejected
    plt = pyplot()
    fig, (ax_r, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    lo, hi = min(chosen.min(), rejected.min()), max(chosen.max(), rejected.max())
    if lo == hi:  # all equal: give the single bin a width
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, int(np.clip(np.sqrt(2 * len(chosen)), 10, 60)) + 1)
    for name, values, color in (("chosen", chosen, "tab:green"), ("rejected", rejected, "tab:red")):
        ax_r.hist(values, bins=bins, alpha=0.5, color=color,
                  label=f"{name} (n={len(values)}, mean {values.mean():.3f})")
    ax_r.set_xlabel("reward")
    ax_r.set_ylabel("pairs")
    ax_r.set_title("Held-out rewards")
    ax_r.legend(fontsize="small")
    ax_m.hist(margins, bins=int(np.clip(np.sqrt(len(margins)), 10, 60)), color="tab:blue", alpha=0.7)
    ax_m.axvline(0, color="black", linestyle="--", linewidth=1)
    ax_m.set_xlabel("margin (chosen - rejected)")
    ax_m.set_ylabel("pairs")
    ax_m.set_title(f"Margins: {np.mean(margins > 0):.1%} > 0 (accuracy) on {len(margins)} pairs")
    return save_figure(fig, path)
