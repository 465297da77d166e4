"""A sweep's plan: its grid (``--grid key=v1,v2``), its trials and their validated configs, and its state
on disk (for ``--resume``). No ray, no mlflow here.

A sweep directory (the config's ``output.dir``) holds ``sweep.json`` (the plan and the parent run),
``trial-<k>/`` (each trial's own output.dir: adapter, checkpoints, summary.json), ``tune/`` (Ray Tune's
state), and at the end ``trials.csv``, ``trials.md``, ``robustness.png`` and ``best.yaml``.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel

from trainer import config as config_lib
from trainer.checkpoints import atomic_write_text
from trainer.config import ConfigError, RunConfig

STATE_FILE = "sweep.json"
SEED_KEY = "train.seed"  # varied per repeat when a grid is run --samples N times


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its index, the swept values (as given on the command line) and its
    validated config (its own output.dir under the sweep's)."""

    index: int
    point: dict[str, str]
    cfg: RunConfig

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


@dataclass
class SweepPlan:
    """What a sweep runs: the swept keys in order, the trials, and where."""

    directory: Path
    keys: list[str]
    trials: list[Trial]
    search: str
    sweep_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parent_run_id: str | None = None
    stopped: list[int] = field(default_factory=list)  # stopped early by the scheduler: not rerun

    def job_id(self, trial: Trial) -> str:
        """A trial's launch id, the same in every launch of the sweep: a rerun trial finds its MLflow run."""
        return uuid.uuid5(uuid.NAMESPACE_URL, f"riemann-tune-sweep:{self.sweep_id}:{trial.index}").hex

    def finished(self, trial: Trial) -> bool:
        return (Path(trial.cfg.output.dir) / "summary.json").is_file() or trial.index in self.stopped


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``--grid key=v1,v2`` arguments as key -> values (strings, parsed as YAML by the config)."""
    if not specs:
        raise ConfigError(
            "sweep: no --grid given: name at least one key and its values (--grid optim.lr=1e-4,1e-3)"
        )
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,...")
        if not items:
            raise ConfigError(f"--grid {key}: no values (an empty grid): give at least one")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        check_key(key)
        grid[key] = items
    return grid


def check_key(key: str) -> None:
    """A dotted key must name a field of the config (``optim.lr``), else one error naming it."""
    model: Any = RunConfig
    for depth, part in enumerate(key.split(".")):
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else None
        if fields is None or part not in fields:
            where = ".".join(key.split(".")[:depth]) or "the config"
            raise ConfigError(f"--grid {key}: unknown key ({part!r} is not a field of {where})")
        model = _section_type(fields[part].annotation)


def _section_type(annotation: Any) -> Any:
    """The config section a field holds (through ``X | None``), or None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def grid_points(
    grid: dict[str, list[str]], search: Literal["grid", "random"], samples: int, seed: int
) -> list[dict[str, str]]:
    """The sweep's points, in order: every combination (``samples`` times, each repeat with its own
    train.seed), or ``samples`` combinations drawn at random from the values."""
    if samples < 1:
        raise ConfigError(f"--samples {samples}: must be >= 1")
    keys = list(grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    if search == "random":
        rng = random.Random(seed)
        return [{k: rng.choice(grid[k]) for k in keys} for _ in range(samples)]
    if samples == 1:
        return combos
    if SEED_KEY in grid:
        raise ConfigError(f"--samples {samples} with --grid {SEED_KEY}: repeats vary the seed themselves")
    return [combo | {SEED_KEY: str(repeat)} for repeat in range(samples) for combo in combos]


def plan_trials(
    base_raw: dict[str, Any], source: str, points: list[dict[str, str]], directory: Path
) -> list[Trial]:
    """Validate every trial's config before anything starts: a value the config refuses is one error
    naming the key and value (or the whole point, when only the combination is refused)."""
    trials = []
    for index, point in enumerate(points):
        trial_dir = directory / f"trial-{index:03d}"
        # resume=auto: a trial rerun after an interruption continues from its newest checkpoint
        fixed = {"output.dir": str(trial_dir), "resume": "auto"}
        try:
            cfg = _validate(base_raw, point | fixed, source)
        except ConfigError as e:
            for key, value in point.items():
                try:
                    _validate(base_raw, {key: value}, source)
                except ConfigError as alone:
                    raise ConfigError(f"--grid {key}={value}: {alone}") from None
            where = " ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"the grid point {where}: {e}") from None
        trials.append(Trial(index, point, cfg))
    return trials


def _validate(base_raw: dict[str, Any], overrides: dict[str, str], source: str) -> RunConfig:
    return config_lib.validate(
        config_lib.apply_overrides(base_raw, [f"{k}={v}" for k, v in overrides.items()]), source
    )


def with_tracking(plan: SweepPlan, tracking: config_lib.TrackingConfig) -> None:
    """Every trial logs to the sweep's store and experiment, as a child of the parent run, under a name
    that says which sweep and trial it is."""
    sweep_name = tracking.run_name or plan.directory.name
    for i, trial in enumerate(plan.trials):
        child = tracking.model_copy(
            update={
                "run_name": f"{sweep_name}/{trial.name}",
                "parent_run_id": plan.parent_run_id,
                "run_id": None,
            }
        )
        plan.trials[i] = Trial(trial.index, trial.point, trial.cfg.model_copy(update={"tracking": child}))


def save_state(plan: SweepPlan) -> None:
    state = {
        "sweep_id": plan.sweep_id,
        "parent_run_id": plan.parent_run_id,
        "search": plan.search,
        "keys": plan.keys,
        "points": [t.point for t in plan.trials],
        "stopped": plan.stopped,
    }
    atomic_write_text(plan.directory / STATE_FILE, json.dumps(state, indent=2) + "\n")


def load_state(plan: SweepPlan, resume: bool) -> None:
    """Adopt the saved sweep (``--resume``): its id, parent run and early stops; its points must be this
    command's. Without ``--resume`` a directory that holds a sweep is refused, never overwritten."""
    path = plan.directory / STATE_FILE
    if not path.is_file():
        if resume:
            raise ConfigError(f"--resume: {path}: no sweep to resume there")
        return
    if not resume:
        raise ConfigError(
            f"{path}: this output.dir already holds a sweep: pass --resume, or another output.dir"
        )
    saved = json.loads(path.read_text())
    if saved["points"] != [t.point for t in plan.trials]:
        raise ConfigError(f"--resume: {path} holds another sweep (other keys or values): give its --grid")
    plan.sweep_id, plan.parent_run_id = saved["sweep_id"], saved["parent_run_id"]
    plan.stopped = list(saved.get("stopped", []))
