"""Run logs: ``metrics.jsonl`` (one JSON object per optimizer step), console lines, the loss curve.

On resume the rows of steps that the checkpoint does not contain (work lost in the crash) are
dropped before appending, so the file always describes one continuous run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from ..extras import require


class MetricsLog:
    def __init__(self, path: str, resume_step: int = 0, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        rows = read_metrics(path) if resume_step else []
        with open(path, "w") as f:
            for r in rows:
                if r.get("step", -1) < resume_step:
                    f.write(json.dumps(r) + "\n")

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(rows: list[dict], path: str, keys=("loss", "loss_mae", "loss_cl"), title: Optional[str] = None) -> str:
    """Write the loss terms against the step as a PNG (matplotlib, the ``bench`` extra)."""
    mpl = require("matplotlib", "bench", "the loss-curve plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    steps = [r["step"] for r in rows]
    for k in keys:
        ys = [r.get(k) for r in rows]
        if any(isinstance(y, (int, float)) for y in ys):
            ax.plot(steps, [y if isinstance(y, (int, float)) else float("nan") for y in ys], label=k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
