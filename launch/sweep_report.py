"""A finished sweep's report: the comparison table (CSV and markdown, the best trial marked), the plot of
final eval loss against each swept value (one line per combination of the other swept values: for
``optim.lr`` x ``optim.preconditioner`` the learning-rate robustness plot), and the best config.

Results come from each trial's own summary.json (what its run wrote), never from MLflow metric names.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.sweep_plan import SweepPlan, Trial
from trainer import config as config_lib
from trainer.checkpoints import atomic_write_text

TABLE_CSV, TABLE_MD, PLOT, BEST = "trials.csv", "trials.md", "robustness.png", "best.yaml"


@dataclass
class Outcome:
    """How one trial ended, and its numbers (None where the run wrote none)."""

    trial: Trial
    status: str  # finished | stopped early | failed | not run
    eval_loss: float | None = None
    eval_loss_first: float | None = None
    train_loss_last: float | None = None
    steps: int | None = None
    mlflow_run_id: str | None = None
    error: str | None = None

    @property
    def score(self) -> float | None:
        """The final eval loss, the sweep's objective (lower is better); finished trials only."""
        if self.status != "finished" or self.eval_loss is None or not math.isfinite(self.eval_loss):
            return None
        return self.eval_loss


def outcome_of(trial: Trial, plan: SweepPlan, error: str | None, reported: dict[str, Any]) -> Outcome:
    """A trial's outcome from its summary.json, else from what it last reported to Tune."""
    summary_path = Path(trial.cfg.output.dir) / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        return Outcome(
            trial, "finished", s.get("eval_loss"), s.get("eval_loss_first"), s.get("train_loss_last"),
            s.get("steps"), s.get("mlflow_run_id"),
        )  # fmt: skip
    status = "failed" if error else ("stopped early" if trial.index in plan.stopped else "not run")
    last = reported.get("trial_eval_loss")
    return Outcome(trial, status, last, steps=reported.get("step"), error=error)


def best_of(outcomes: list[Outcome]) -> Outcome | None:
    scored = [o for o in outcomes if o.score is not None]
    return min(scored, key=lambda o: o.score or 0.0) if scored else None


COLUMNS = [
    "best",
    "trial",
    "status",
    "final eval loss",
    "first eval loss",
    "final train loss",
    "steps",
    "mlflow run",
]


def rows(plan: SweepPlan, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    best = best_of(outcomes)
    return [
        {
            "best": "*" if o is best else "",
            "trial": o.trial.name,
            **{k: o.trial.point.get(k, "") for k in plan.keys},
            "status": o.status,
            "final eval loss": o.eval_loss,
            "first eval loss": o.eval_loss_first,
            "final train loss": o.train_loss_last,
            "steps": o.steps,
            "mlflow run": o.mlflow_run_id or "",
        }
        for o in outcomes
    ]


def _columns(plan: SweepPlan) -> list[str]:
    return [*COLUMNS[:2], *plan.keys, *COLUMNS[2:]]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def to_csv(plan: SweepPlan, table: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_columns(plan), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in table)
    return out.getvalue()


def to_markdown(plan: SweepPlan, table: list[dict[str, Any]]) -> str:
    columns = _columns(plan)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n\n`*`: the best trial, the lowest final eval loss of the finished trials.\n"


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plot(plan: SweepPlan, outcomes: list[Outcome], path: Path) -> None:
    """One panel per swept key: final eval loss against its values, one line per combination of the
    other keys' values (a numeric key spanning more than 10x on a log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plan.keys), figsize=(6 * len(plan.keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], plan.keys, strict=True):
        values = list(dict.fromkeys(o.trial.point[key] for o in outcomes))
        numbers = [_number(v) for v in values]
        numeric = all(n is not None for n in numbers)
        position = {v: (n if numeric else i) for i, (v, n) in enumerate(zip(values, numbers, strict=True))}
        others = [k for k in plan.keys if k != key]
        lines: dict[str, list[tuple[float, float]]] = {}
        for o in outcomes:
            if o.score is None:
                continue
            label = ", ".join(f"{k}={o.trial.point[k]}" for k in others) or "eval loss"
            lines.setdefault(label, []).append((float(position[o.trial.point[key]] or 0.0), o.score))
        for label, points in lines.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        positive = numeric and all(n is not None and n > 0 for n in numbers)
        if positive and max(n or 1.0 for n in numbers) / min(n or 1.0 for n in numbers) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel("final eval loss")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"sweep {plan.directory.name}: final eval loss per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(plan: SweepPlan, outcomes: list[Outcome]) -> list[Path]:
    """trials.csv, trials.md, robustness.png and best.yaml in the sweep directory; returns their paths."""
    table = rows(plan, outcomes)
    d = plan.directory
    atomic_write_text(d / TABLE_CSV, to_csv(plan, table))
    atomic_write_text(d / TABLE_MD, to_markdown(plan, table))
    written = [d / TABLE_CSV, d / TABLE_MD]
    plot(plan, outcomes, d / PLOT)
    written.append(d / PLOT)
    best = best_of(outcomes)
    if best is not None:
        saved = Path(best.trial.cfg.output.dir) / "config.yaml"
        header = f"# the best trial of sweep {d}: {best.trial.name}, final eval loss {best.score:.6g}\n"
        body = saved.read_text() if saved.is_file() else config_lib.to_yaml(best.trial.cfg)
        atomic_write_text(d / BEST, header + body)
        written.append(d / BEST)
    else:
        (d / BEST).unlink(missing_ok=True)
    return written


def print_table(plan: SweepPlan, outcomes: list[Outcome]) -> None:
    table = rows(plan, outcomes)
    columns = [c for c in _columns(plan) if c != "mlflow run"]
    cells = [[_cell(r[c]) or "-" for c in columns] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
