"""The loss curve of a run as a PNG, drawn from its metrics.jsonl (matplotlib's Agg canvas, no pyplot:
no global backend state, no display needed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from trainer.checkpoints import atomic_write_bytes


def read_rows(metrics_jsonl: Path) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl file (a torn last line, from a crash mid-write, is skipped)."""
    rows = []
    for line in metrics_jsonl.read_text().splitlines() if metrics_jsonl.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curve(metrics_jsonl: Path, png: Path) -> bool:
    """Train loss per step and eval loss where measured, into ``png``; False when there is nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_rows(metrics_jsonl)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not train and not evals:
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png, buf.getvalue())
    return True
