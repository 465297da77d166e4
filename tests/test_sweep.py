"""Sweeps (`python -m launch sweep`): the plan and its bad input, the report, and real sweeps on a real
local Ray cluster with a real MLflow server on 127.0.0.1: a 2 x 2 grid under one parent run, a sweep
killed mid-way and resumed, and a placement that cannot fit failing at once."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch.cli import main
from launch.ray_sweep import PlacementError, TrialNeeds, concurrency
from launch.sweep_plan import SweepPlan, Trial, grid_points, load_state, parse_grid, plan_trials, save_state
from launch.sweep_report import BEST, PLOT, TABLE_CSV, TABLE_MD, outcome_of, write_report
from tests.conftest import DEMO_CONFIG, ROOT, TEXT_DATA, has_usable_checkpoint, run_cli, start_cli, wait_for
from tests.mlflow_server import MlflowServer, free_port
from tests.processes import Daemon, session_pids
from trainer.config import ConfigError

# Tiny trials: one worker, 4 steps, one eval batch at the start and the end, no checkpoints.
TINY = [
    *TEXT_DATA,  # the longer rows: the kill below lands between trials' checkpoints, as measured
    "distributed.num_workers=1", "train.max_steps=4", "train.eval_every_n_steps=0",
    "train.eval_max_batches=1", "checkpoint.every_n_steps=0", "tracking.system_metrics=false",
]  # fmt: skip
GRID = ["--grid", "optim.lr=1e-3,3e-2", "--grid", "optim.preconditioner=riemannian,none"]


# ---- the plan and bad input (unit) ----


@pytest.mark.unit
@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["--grid", "optim.lrr=1e-3,1e-2"], "--grid optim.lrr: unknown key ('lrr' is not a field of optim)"),
        (
            ["--grid", "optimizer.lr=1e-3"],
            "--grid optimizer.lr: unknown key ('optimizer' is not a field of the",
        ),
        (["--grid", "optim.lr="], "--grid optim.lr: no values (an empty grid)"),
        ([], "sweep: no --grid given"),
        (["--grid", "optim.lr=1e-3,-1"], "--grid optim.lr=-1: invalid configuration"),
        (["--grid", "adapter.rank=8,zero"], "--grid adapter.rank=zero: invalid configuration"),
    ],
)
def test_bad_grid_is_one_error_naming_it_and_exit_2(
    grid: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sweep", str(DEMO_CONFIG), *grid, f"output.dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "sweep").exists(), "nothing may start before the whole grid is valid"


@pytest.mark.unit
def test_a_combination_the_config_refuses_names_the_point(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """bone with the Riemannian preconditioner is refused only together (each alone is valid)."""
    args = ["--grid", "adapter.method=lora,bone", "--grid", "optim.preconditioner=riemannian"]
    base = [f"output.dir={tmp_path / 'sweep'}", "optim.preconditioner=none"]
    assert main(["sweep", str(DEMO_CONFIG), *args, *base]) == 2
    err = capsys.readouterr().err
    assert "the grid point adapter.method=bone optim.preconditioner=riemannian" in err, err


@pytest.mark.unit
def test_grid_points_are_every_combination_or_a_seeded_random_draw() -> None:
    grid = parse_grid(["optim.lr=1e-3,1e-2", "optim.preconditioner=riemannian,none"])
    assert grid_points(grid, "grid", 1, 0) == [
        {"optim.lr": "1e-3", "optim.preconditioner": "riemannian"},
        {"optim.lr": "1e-3", "optim.preconditioner": "none"},
        {"optim.lr": "1e-2", "optim.preconditioner": "riemannian"},
        {"optim.lr": "1e-2", "optim.preconditioner": "none"},
    ]
    repeated = grid_points(grid, "grid", 2, 0)
    assert len(repeated) == 8 and {p["train.seed"] for p in repeated} == {"0", "1"}
    drawn = grid_points(grid, "random", 5, seed=3)
    assert drawn == grid_points(grid, "random", 5, seed=3) and len(drawn) == 5
    assert all(p["optim.lr"] in ("1e-3", "1e-2") for p in drawn)
    with pytest.raises(ConfigError, match=r"--grid adapter\.sara\.tua"):
        parse_grid(["adapter.sara.tua=0.5"])
    parse_grid(["adapter.sara.tau=0.5,0.9"])  # a nested section's field is a valid key


@pytest.mark.unit
def test_placement_that_cannot_fit_names_the_numbers() -> None:
    with pytest.raises(PlacementError, match=r"4 workers x 2 CPUs = 8 CPUs .* the Ray cluster has 6"):
        concurrency(TrialNeeds(4, 2.0, 0.0), cpus=6, gpus=0, requested=None, trials=3)
    with pytest.raises(PlacementError, match=r"2 workers x 1 GPUs = 2 GPUs .* the Ray cluster has 1"):
        concurrency(TrialNeeds(2, 1.0, 1.0), cpus=64, gpus=1, requested=None, trials=3)
    assert concurrency(TrialNeeds(2, 1.0, 1.0), cpus=64, gpus=8, requested=None, trials=10) == 4
    assert concurrency(TrialNeeds(1, 1.0, 0.0), cpus=3, gpus=0, requested=8, trials=10) == 2  # what fits
    assert concurrency(TrialNeeds(1, 1.0, 0.0), cpus=16, gpus=0, requested=None, trials=3) == 3


def _plan(tmp_path: Path, make_config: object) -> SweepPlan:
    base = make_config().model_dump(mode="json")  # type: ignore[operator]
    points = grid_points(
        parse_grid(["optim.lr=1e-3,1e-2", "optim.preconditioner=riemannian,none"]), "grid", 1, 0
    )
    return SweepPlan(
        tmp_path / "sweep", list(points[0]), plan_trials(base, "<test>", points, tmp_path / "sweep"), "grid"
    )


@pytest.mark.unit
def test_report_marks_the_lowest_final_eval_loss_and_writes_table_plot_and_best_config(
    tmp_path: Path, make_config: object
) -> None:
    plan = _plan(tmp_path, make_config)
    losses = [2.5, 2.1, 1.7, 2.9]
    for trial, loss in zip(plan.trials[:3], losses, strict=False):  # the fourth never finished
        out = Path(trial.cfg.output.dir)
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"eval_loss": loss, "eval_loss_first": 3.0, "steps": 4}))
    plan.stopped = [3]
    outcomes = [
        outcome_of(t, plan, None, {"trial_eval_loss": 2.9, "step": 2} if t.index == 3 else {})
        for t in plan.trials
    ]
    write_report(plan, outcomes)
    lines = (plan.directory / TABLE_CSV).read_text().splitlines()
    assert lines[0].startswith("best,trial,optim.lr,optim.preconditioner,status,final eval loss")
    starred = [line for line in lines[1:] if line.startswith("*")]
    assert starred == ["*,trial-002,1e-2,riemannian,finished,1.7,3,,4,"]
    assert "trial-003,1e-2,none,stopped early,2.9" in lines[4]
    assert "| * | trial-002 | 1e-2 | riemannian | finished | 1.7 |" in (plan.directory / TABLE_MD).read_text()
    assert (plan.directory / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = (plan.directory / BEST).read_text()
    assert "trial-002" in best.splitlines()[0] and "lr: 0.01" in best and "preconditioner: riemannian" in best


@pytest.mark.unit
def test_a_sweep_directory_is_never_overwritten_and_resume_needs_the_same_grid(
    tmp_path: Path, make_config: object
) -> None:
    plan = _plan(tmp_path, make_config)
    plan.directory.mkdir(parents=True)
    plan.parent_run_id, plan.stopped = "abc", [1]
    save_state(plan)
    again = _plan(tmp_path, make_config)
    with pytest.raises(ConfigError, match="already holds a sweep: pass --resume"):
        load_state(again, resume=False)
    load_state(again, resume=True)
    assert (again.sweep_id, again.parent_run_id, again.stopped) == (plan.sweep_id, "abc", [1])
    assert again.job_id(again.trials[2]) == plan.job_id(plan.trials[2])  # a rerun trial finds its MLflow run
    other = SweepPlan(plan.directory, plan.keys, [Trial(0, {"optim.lr": "5"}, plan.trials[0].cfg)], "grid")
    with pytest.raises(ConfigError, match="holds another sweep"):
        load_state(other, resume=True)


@pytest.mark.unit
def test_a_child_run_is_nested_under_the_sweeps_parent(tmp_path: Path) -> None:
    """tracking.parent_run_id makes the trial's own run a child (mlflow.parentRunId); the parent gets the
    sweep's params, results and artefacts, and is found again (not duplicated) on resume."""
    from mlflow.tracking import MlflowClient

    from trainer.config import TrackingConfig
    from trainer.tracking import MlflowTracker
    from trainer.tracking.sweep_run import child_runs, finish_parent_run, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri, experiment="sweeps", run_name="s", system_metrics=False, drain_timeout_s=30)
    parent = start_parent_run(cfg, "s", {"sweep.grid.optim.lr": "1e-3,1e-2"})
    assert start_parent_run(cfg, "s", {}, run_id=parent) == parent
    child = MlflowTracker(cfg.model_copy(update={"run_name": "s/trial-000", "parent_run_id": parent}))
    child.log_metrics({"loss": 1.0}, 1)
    child.flush()
    child.finish()
    table = tmp_path / "trials.csv"
    table.write_text("best,trial\n*,trial-000\n")
    finish_parent_run(uri, parent, {"best_eval_loss": 1.5}, [table])
    client = MlflowClient(uri)
    assert [r.info.run_id for r in child_runs(uri, parent)] == [child.run_id]
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics == {"best_eval_loss": 1.5}
    assert run.data.params["sweep.grid.optim.lr"] == "1e-3,1e-2"
    assert [a.path for a in client.list_artifacts(parent)] == ["trials.csv"]
    assert len(client.search_runs([run.info.experiment_id])) == 2


# ---- real sweeps ----


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def grid_sweep(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """A 2 x 2 grid (learning rate x preconditioner) of tiny runs, 2 at a time, logged to the server."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    start = time.monotonic()
    proc = run_cli(
        "sweep", str(DEMO_CONFIG), *GRID, "--max-concurrent", "2", *TINY, f"output.dir={out}",
        f"tracking.uri={server.uri}", "tracking.experiment=sweep-test", timeout=1200,
    )  # fmt: skip
    return out, proc.stdout, time.monotonic() - start


@pytest.mark.slow
def test_grid_sweep_is_one_parent_with_a_child_per_point(grid_sweep: tuple, server: MlflowServer) -> None:
    from mlflow.tracking import MlflowClient

    out, _, _ = grid_sweep
    state = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [state["parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert len(children) == 4 and len(runs) == 5
    by_name = {c.info.run_name.rsplit("/", 1)[-1]: c for c in children}
    for index, point in enumerate(state["points"]):
        child = by_name[f"trial-{index:03d}"]
        assert child.info.status == "FINISHED"
        assert math.isclose(float(child.data.params["optim.lr"]), float(point["optim.lr"]))
        assert child.data.params["optim.preconditioner"] == point["optim.preconditioner"]
        assert child.data.params["output.dir"] == str(out / f"trial-{index:03d}")
        summary = json.loads((out / f"trial-{index:03d}" / "summary.json").read_text())
        assert summary["mlflow_run_id"] == child.info.run_id
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.grid.optim.lr"] == "1e-3,3e-2"
    artefacts = {a.path for a in client.list_artifacts(state["parent_run_id"])}
    assert {TABLE_CSV, TABLE_MD, PLOT, BEST} <= artefacts


@pytest.mark.slow
def test_the_best_trial_is_the_lowest_final_eval_loss(grid_sweep: tuple) -> None:
    out, stdout, seconds = grid_sweep
    finals = {
        f"trial-{i:03d}": json.loads((out / f"trial-{i:03d}" / "summary.json").read_text())["eval_loss"]
        for i in range(4)
    }
    best = min(finals, key=lambda name: finals[name])
    starred = [line for line in (out / TABLE_CSV).read_text().splitlines() if line.startswith("*")]
    assert len(starred) == 1 and starred[0].split(",")[1] == best, (starred, finals)
    assert f"best: {best}" in stdout
    assert (out / PLOT).stat().st_size > 10_000
    assert f"# the best trial of sweep {out}: {best}" in (out / BEST).read_text()
    print(f"2 x 2 sweep: {seconds:.0f} s; final eval losses {finals}")


@pytest.mark.slow
def test_runs_lists_the_trials_of_a_sweep(grid_sweep: tuple, server: MlflowServer) -> None:
    out, _, _ = grid_sweep
    parent = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    lines = run_cli("runs", "--uri", server.uri, "--sweep", parent).stdout.splitlines()
    assert lines[0].split()[:3] == ["trial", "optim.lr", "optim.preconditioner"]
    assert [line.split()[0] for line in lines[2:]] == [f"trial-{i:03d}" for i in range(4)]
    assert all("FINISHED" in line for line in lines[2:])


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_a_finished_trial(tmp_path: Path) -> None:
    """Three trials one at a time; killed (the driver, Ray and every worker) once the first has finished
    and the second has a checkpoint. The resumed sweep reruns only the second (from its checkpoint, in
    the same MLflow child run) and the third, under the same parent run."""
    out = tmp_path / "sweep"
    steps = [
        "train.max_steps=8",
        "checkpoint.every_n_steps=2",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    args = [
        "sweep",
        str(DEMO_CONFIG),
        "--grid",
        "optim.lr=1e-3,3e-3,1e-2",
        "--max-concurrent",
        "1",
        *TINY,
        *steps,
    ]
    args.append(f"output.dir={out}")
    proc = start_cli(*args, log=tmp_path / "killed.log")
    try:
        wait_for(
            lambda: (out / "trial-000" / "summary.json").is_file(), 900, "the first trial to finish", proc
        )
        wait_for(lambda: has_usable_checkpoint(out / "trial-001" / "checkpoints"), 600, "a checkpoint", proc)
    finally:
        for pid in session_pids(proc.pid):  # the driver, its local Ray cluster and the trials' workers
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    first = (out / "trial-000" / "summary.json").read_bytes()
    assert not (out / "trial-002" / "summary.json").exists(), "the sweep finished before it was killed"
    parent = json.loads((out / "sweep.json").read_text())["parent_run_id"]

    resumed = run_cli(*args, "--resume", timeout=1200)
    assert "3 trials, 1 already done, 2 to run" in resumed.stdout
    assert (out / "trial-000" / "summary.json").read_bytes() == first, "a finished trial was rerun"
    assert json.loads((out / "trial-000" / ".jobs").iterdir().__next__().read_text())["attempts"] == 1
    assert (
        "resumed from" in resumed.stdout + resumed.stderr
        and "trial-001/checkpoints" in resumed.stdout + resumed.stderr
    )
    assert json.loads((out / "sweep.json").read_text())["parent_run_id"] == parent
    assert all(
        json.loads((out / f"trial-{i:03d}" / "summary.json").read_text())["steps"] == 8 for i in range(3)
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert sorted(c.info.run_name.rsplit("/", 1)[-1] for c in children) == [
        "trial-000",
        "trial-001",
        "trial-002",
    ]


@pytest.mark.integration
def test_impossible_placement_fails_fast_with_the_numbers(tmp_path: Path) -> None:
    """A Ray cluster of 1 CPU (a real `ray start --head`) and trials of 2 workers x 1 CPU: the sweep
    stops before any trial starts, naming both numbers, instead of waiting for CPUs that never come."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-sw-"))  # short: Ray's socket paths must fit 107 bytes
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    env = os.environ | {
        "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    }  # fmt: skip
    gcs = free_port()
    ray = Path(sys.executable).parent / "ray"
    head = Daemon(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
         f"--temp-dir={ray_tmp}", "--include-dashboard=false", "--disable-usage-stats"],
        tmp_path / "head.log", env,
    )  # fmt: skip
    try:
        wait_for((ray_tmp / "ray_current_cluster").is_file, 180, "the Ray head", head.proc)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "launch", "sweep", str(DEMO_CONFIG), "--grid", "optim.lr=1e-3,1e-2", *TINY,
             "distributed.num_workers=2", f"distributed.ray_address=127.0.0.1:{gcs}",
             f"output.dir={tmp_path / 'sweep'}", "tracking.enabled=false"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        seconds = time.monotonic() - start
    finally:
        head.stop(grace_s=5)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: a trial needs 2 workers x 1 CPUs = 2 CPUs" in proc.stderr, proc.stderr
    assert "the Ray cluster has 1" in proc.stderr
    assert not (tmp_path / "sweep" / "sweep.json").exists(), "nothing is recorded for a sweep that cannot run"
    assert seconds < 120, f"took {seconds:.0f} s to fail"


@pytest.mark.slow
def test_asha_stops_a_hopeless_trial_early(tmp_path: Path) -> None:
    """Two trials one after the other, the good learning rate first: at the first rung (step 2) the second
    trial's eval loss is worse than the first's, and ASHA (reduction factor 2) stops it there. It leaves
    no outputs, shows as stopped early, and a resume would not rerun it."""
    out = tmp_path / "sweep"
    run = [
        "train.max_steps=6", "train.eval_every_n_steps=2", "tracking.enabled=false",
        f"output.dir={out}",
    ]  # fmt: skip
    grid = ["--grid", "optim.lr=1e-2,1e-5"]  # 3e-2 diverges here in its first steps
    proc = run_cli(
        "sweep", str(DEMO_CONFIG), *grid, "--scheduler", "asha", "--max-concurrent", "1", *TINY, *run,
        timeout=1200,
    )  # fmt: skip
    assert (out / "trial-000" / "summary.json").is_file()
    assert not (out / "trial-001" / "summary.json").exists()
    assert json.loads((out / "sweep.json").read_text())["stopped"] == [1]
    rows = (out / TABLE_CSV).read_text().splitlines()
    assert rows[1].startswith("*,trial-000,1e-2,finished") and rows[2].startswith(
        ",trial-001,1e-5,stopped early"
    )
    resumed = run_cli("sweep", str(DEMO_CONFIG), *grid, "--resume", *TINY, *run)
    assert "2 trials, 2 already done, 0 to run" in resumed.stdout
    assert proc.returncode == 0
