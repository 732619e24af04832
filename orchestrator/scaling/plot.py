"""The prediction as a picture: held-out loss against training compute, log-scaled.

Shows each sweep run's final held-out loss (filled circles) and its evaluations along the way
(small faint dots), the fitted ``L(C) = a*C^b + c`` from the smallest run to past the target, the
irreducible loss ``c`` (dotted), the prediction for the target with its bootstrap interval (an error
bar) and, once the target has run, its actual final loss (a star).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot(doc: dict[str, Any], out: Path) -> None:
    """Write the PNG of prediction ``doc`` (from :func:`orchestrator.scaling.predict.predict`) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    points = doc["points"]
    law = doc["compute_law"]
    target_c = doc["target"]["compute_flops"]
    finals: dict[str, dict[str, Any]] = {}
    for p in points:
        if p["run"] not in finals or p["tokens"] > finals[p["run"]]["tokens"]:
            finals[p["run"]] = p
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.scatter([p["compute"] for p in points], [p["loss"] for p in points], s=6, color="tab:blue", alpha=0.25,
               label="sweep: evaluations during training")
    ax.scatter([p["compute"] for p in finals.values()], [p["loss"] for p in finals.values()], s=36,
               color="tab:blue", zorder=3, label="sweep: final held-out loss")
    grid = np.logspace(np.log10(min(p["compute"] for p in finals.values())), np.log10(target_c * 2), 200)
    ax.plot(grid, law["a"] * grid ** law["b"] + law["c"], color="tab:orange",
            label=f"fit: {law['a']:.3g}·C^{law['b']:.3f} + {law['c']:.3f}")
    ax.axhline(law["c"], color="tab:orange", linestyle=":", linewidth=1, label=f"irreducible loss c = {law['c']:.3f}")
    predicted, (low, high) = doc["prediction"]["final_loss"], doc["prediction"]["interval"]
    ax.errorbar([target_c], [predicted], yerr=[[max(0.0, predicted - low)], [max(0.0, high - predicted)]], fmt="D", color="tab:red",
                capsize=5, zorder=4,
                label=f"target, predicted: {predicted:.4f} ({doc['level']:.0%} interval {low:.4f}–{high:.4f})")
    actual = doc.get("actual")
    if actual is not None:
        error = (predicted - actual["final_loss"]) / actual["final_loss"]
        ax.scatter([target_c], [actual["final_loss"]], marker="*", s=180, color="black", zorder=5,
                   label=f"target, actual: {actual['final_loss']:.4f} (prediction off by {error:+.2%})")
    ax.set_xscale("log")
    ax.set_xlabel(f"training compute C (FLOPs, {doc['compute']})")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title("Predicting the target's held-out loss from the sweep")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
