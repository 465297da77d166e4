"""Tracking: one MLflow run per job, everything a user compares, and never the reason a run dies.

The unit tier checks configuration, secrets, artefacts, measurements and the MLflow tracker on
MLflow's embedded sqlite store (the background sender has its own tests in tests/test_sender.py).
The integration tier runs real training jobs against a real ``mlflow server`` on 127.0.0.1 that the
tests start, kill and restart.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, run_cli, write_config
from tests.mlflow_server import MlflowServer, free_port
from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig, TrackingConfig
from trainer.tracking import MlflowTracker, adapter_artifacts, make_tracker, redact, resolve_tracking

SECRET = "tok-5ecret-never-logged-0451"


# -- configuration, secrets, artefacts, measurements --------------------------------------------------


@pytest.mark.unit
def test_uri_experiment_and_run_name_come_from_config_then_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = str(tmp_path / "runs" / "r1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    embedded = resolve_tracking(TrackingConfig(), out)
    assert embedded.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (embedded.experiment, embedded.run_name) == ("default", "r1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    env = resolve_tracking(TrackingConfig(), out)
    assert (env.uri, env.experiment) == ("http://127.0.0.1:5999", "from-env")
    ours = resolve_tracking(TrackingConfig(uri="http://127.0.0.1:1", experiment="e", run_name="n"), out)
    assert (ours.uri, ours.experiment, ours.run_name) == ("http://127.0.0.1:1", "e", "n")


@pytest.mark.unit
def test_credentials_in_a_tracking_uri_are_refused(
    make_config: Callable[..., RunConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"tracking\.uri: .*must not contain credentials"):
        make_config("tracking.uri=https://alice:hunter22@mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter22@mlflow.example:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: must not contain credentials") as e:
        resolve_tracking(TrackingConfig(), "/tmp/x")
    assert "hunter22" not in str(e.value)
    with pytest.raises(ConfigError, match="registered_model needs log_adapter"):
        make_config("tracking.registered_model=m", "tracking.log_adapter=false")


@pytest.mark.unit
def test_credentials_are_redacted_from_messages() -> None:
    env = {"MLFLOW_TRACKING_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": "aws-key-1234", "HOME": "/root"}
    message = f"401 for Bearer {SECRET} with aws-key-1234 at /root"
    assert redact(message, env) == "401 for Bearer *** with *** at /root"


@pytest.mark.unit
def test_adapter_artefacts_keep_small_files_and_weights_only_when_asked(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    (adapter / "sub").mkdir(parents=True)
    for name in ("adapter_config.json", "riemann_tune.json", "rank_map.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}")
    (adapter / "sub" / "weights.bin").write_text("x")
    names = {p.relative_to(adapter).as_posix() for p in adapter_artifacts(adapter, include_weights=False)}
    assert names == {"adapter_config.json", "riemann_tune.json", "rank_map.json"}
    every = {p.relative_to(adapter).as_posix() for p in adapter_artifacts(adapter, include_weights=True)}
    assert every == names | {"adapter_model.safetensors", "sub/weights.bin"}


@pytest.mark.unit
def test_loss_curve_png_shows_both_curves(tmp_path: Path) -> None:
    import matplotlib.image

    from trainer.tracking import plot_loss_curve

    rows = [{"step": 0, "eval/loss": 3.0}] + [{"step": s, "train/loss": 3.0 / s} for s in range(1, 21)]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "lo')  # torn last line
    assert plot_loss_curve(jsonl, tmp_path / "curve.png")
    image = matplotlib.image.imread(tmp_path / "curve.png")
    assert image.shape[:2] == (400, 700)
    rgb = image[..., :3].reshape(-1, 3)
    blue, orange = torch.tensor([0.12, 0.47, 0.71]), torch.tensor([1.0, 0.5, 0.05])  # tab:blue, tab:orange

    def pixels(colour: torch.Tensor) -> int:
        return int((torch.from_numpy(rgb) - colour).abs().max(dim=1).values.lt(0.05).sum())

    assert pixels(blue) > 100 and pixels(orange) > 20, "both curves are drawn"
    assert not plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "none.png")


@pytest.mark.unit
def test_peak_memory_per_rank_matches_the_kernels_high_water_mark(tmp_path: Path) -> None:
    import torch.distributed as dist

    from trainer.tracking import memory_metrics

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs Linux's /proc")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metrics = memory_metrics(torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    hwm_kib = next(
        int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")
    )
    assert set(metrics) == {"system/memory_peak_mb", "system/memory_peak_mb.rank0"}
    assert metrics["system/memory_peak_mb.rank0"] == metrics["system/memory_peak_mb"]
    assert metrics["system/memory_peak_mb"] == pytest.approx(hwm_kib / 1024, abs=2.0)


# -- the MLflow tracker on the embedded sqlite store ---------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedded store for the module: creating one runs MLflow's schema migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


def _sqlite_tracking(uri: str, experiment: str) -> TrackingConfig:
    return TrackingConfig(
        uri=uri, experiment=experiment, run_name="r", system_metrics=False, drain_timeout_s=30
    )


@pytest.mark.unit
def test_resuming_a_run_id_continues_the_same_run(sqlite_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _sqlite_tracking(sqlite_uri, "resume")
    first = MlflowTracker(cfg)
    first.log_params({"train.max_steps": "3", "adapter.rank": "8"})
    for step in range(1, 4):
        first.log_metrics({"loss": 1.0 / step}, step)
    assert first.flush()["mlflow_metric_rows_dropped"] == 0
    first.finish("KILLED")
    run_id = first.run_id
    assert run_id is not None

    with caplog.at_level(logging.WARNING):
        second = MlflowTracker(cfg, run_id=run_id)
        second.log_params({"train.max_steps": "6", "adapter.rank": "8", "optim.lr": "0.01"})
        for step in range(4, 7):
            second.log_metrics({"loss": 1.0 / step}, step)
        second.flush()
        second.finish()
    assert second.run_id == run_id
    assert "resumed with changed params (kept as first logged): train.max_steps" in caplog.text
    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["riemann_tune.resumes"] == "1"
    assert run.data.params == {"train.max_steps": "3", "adapter.rank": "8", "optim.lr": "0.01"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (s, 1.0 / s) for s in range(1, 7)
    ]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.unit
def test_a_resume_sends_what_the_killed_attempt_queued_and_cuts_the_local_record(
    sqlite_uri: str, tmp_path: Path
) -> None:
    """Killed at step 6 with steps 1-2 still queued, resumed from the checkpoint of step 4: MLflow gets
    steps 1 and 2 from metrics.jsonl, once; the file forgets steps 5-6, which the resumed run replays."""
    from mlflow.tracking import MlflowClient

    cfg = _sqlite_tracking(sqlite_uri, "backfill")
    first = MlflowTracker(cfg)
    for step in (3, 4, 5):  # what reached the server before the kill
        first.log_metrics({"loss": 1.0 / step}, step)
    first.flush()
    first.finish("KILLED")
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    tracker = make_tracker(cfg, str(out), rank=0, run_id=first.run_id, resumed_at=4)
    tracker.log_metrics({"loss": 1.0 / 5}, 5)
    tracker.flush()
    tracker.finish()
    history = MlflowClient(sqlite_uri).get_metric_history(first.run_id, "loss")  # type: ignore[arg-type]
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 5]  # 5: the killed attempt's and the replay
    local = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert local == [1, 2, 3, 4, 5]


@pytest.mark.unit
def test_resuming_an_unknown_run_id_starts_a_new_run(
    sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _sqlite_tracking(sqlite_uri, "unknown-id")
    with caplog.at_level(logging.WARNING):
        tracker = MlflowTracker(cfg, run_id="0" * 32)
        tracker.log_metrics({"loss": 1.0}, 1)
        summary = tracker.flush()
        tracker.finish()
    assert "does not exist" in caplog.text
    assert summary["mlflow_run_id"] not in (None, "0" * 32)


# -- real jobs against a real MLflow server --------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _rows(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_histories_match_jsonl(client: Any, run_id: str, rows: list[dict[str, float]]) -> None:
    """Every metric of every row of metrics.jsonl is in the run's history, with nothing extra."""
    keys = {k for r in rows for k in r} - {"step"}
    for key in keys:
        want = [(int(r["step"]), r[key]) for r in rows if key in r]
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(got) == sorted(want), key  # float64 through JSON and MLflow: exact


@pytest.fixture(scope="module")
def two_worker_run(
    mlflow_server: MlflowServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """6 steps on 2 local workers against the server, a token in the environment that must not leak."""
    tmp = tmp_path_factory.mktemp("two-workers")
    out = tmp / "run"
    cfg = _server_config(tiny_model_dir, out, mlflow_server.uri, "two-workers",
        "distributed.num_workers=2", "train.max_steps=6", "train.eval_every_n_steps=3",
        "tracking.registered_model=tiny-adapter", "tracking.system_metrics_interval_s=0.1")  # fmt: skip
    os.environ.update(MLFLOW_TRACKING_TOKEN=SECRET, RIEMANN_TUNE_TEST_NOISE=SECRET)
    threads = os.environ.pop("OMP_NUM_THREADS", None)  # the launcher's own share of the cores
    try:
        proc = run_cli("train", str(write_config(cfg, tmp / "cfg.yaml")))
    finally:
        for key in ("MLFLOW_TRACKING_TOKEN", "RIEMANN_TUNE_TEST_NOISE"):
            os.environ.pop(key)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads
    return out, proc


def _server_config(model: Path, out: Path, uri: str, experiment: str, *overrides: str) -> RunConfig:
    raw = {
        "model": {"path": str(model)},
        "data": {"train_path": str(ROOT / "data/tiny/train.jsonl"),
                 "eval_path": str(ROOT / "data/tiny/eval.jsonl"), "max_seq_len": 96},
        "train": {"micro_batch_size": 4, "eval_max_batches": 2},
        "tracking": {"uri": uri, "experiment": experiment, "retry_max_s": 1.0},
        "output": {"dir": str(out)},
    }  # fmt: skip
    return config_lib.validate(config_lib.apply_overrides(raw, list(overrides)))


@pytest.mark.integration
def test_two_workers_log_one_run_with_params_tags_metrics_and_artefacts(
    mlflow_server: MlflowServer, two_worker_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    out, _ = two_worker_run
    summary = json.loads((out / "summary.json").read_text())
    client = _client(mlflow_server.uri)
    experiment = client.get_experiment_by_name("two-workers")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]], "one job, one run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params, tags = run.data.params, run.data.tags
    assert params["distributed.num_workers"] == "2" and params["adapter.rank"] == "8"
    assert params["tracking.uri"] == mlflow_server.uri and "tracking.run_id" not in params
    # every setting but the run's own identity (its id, its parent's)
    assert "tracking.parent_run_id" not in params
    assert len(params) == len(config_lib.flatten(config_lib.load(out / "config.yaml"))) - 2
    assert tags["world_size"] == "2" and tags["launcher"] == "local"
    assert tags["hostname"] and tags["cpu"] and tags["versions.torch"] == torch.__version__
    assert tags["cpu_threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2)), (
        "two local workers share the cores rather than each running a thread per core"
    )
    assert tags["versions.mlflow"] and tags["versions.deepspeed"] and len(tags["git_commit"]) == 40

    rows = _rows(out)
    assert sorted({int(r["step"]) for r in rows}) == list(range(7)), "eval at step 0, then every step"
    assert [int(r["step"]) for r in rows if "train/loss" in r] == list(range(1, 7))
    _assert_histories_match_jsonl(client, run.info.run_id, rows)
    logged = run.data.metrics
    for key in ("train/loss", "eval/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/step_time_s", "train/preconditioner_fallbacks", "system/memory_peak_mb.rank0",
                "system/memory_peak_mb.rank1"):  # fmt: skip
        assert key in logged, key
    assert (
        100 < logged["system/memory_peak_mb.rank1"] < 16_000
        and logged["system/memory_peak_mb.rank0"] != logged["system/memory_peak_mb.rank1"]
    ), "each rank reports its own process"
    assert any(k.startswith("system/cpu_utilization") for k in logged), "MLflow system metrics"
    assert summary["mlflow_metric_rows"] == len(rows) == 7 and summary["mlflow_metric_rows_dropped"] == 0
    assert float(tags["data/train_examples"]) == summary["data"]["data/train_examples"], "data facts: tags"
    assert not any(k.startswith("data/") for k in logged), "no single-point charts of the data's sizes"

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "loss_curve.png", "adapter"} <= top
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    (version,) = client.search_model_versions("name='tiny-adapter'")
    assert version.run_id == run.info.run_id and version.source.endswith("/adapter")


@pytest.mark.integration
def test_sample_answers_reach_mlflow_as_a_table(
    mlflow_server: MlflowServer,
    two_worker_run: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    """At each evaluation (steps 0, 3, 6) the first 4 eval prompts are answered: 12 rows, read back from
    the server as the table the UI shows, equal to the run's samples.jsonl."""
    out, _ = two_worker_run
    summary = json.loads((out / "summary.json").read_text())
    client = _client(mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    # What the UI reads: the run's tag naming a table artefact, and the artefact (MLflow's table JSON).
    # Not client.load_table: it searches runs through the global tracking URI, not the client's.
    assert {"path": "samples.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    artefact = client.download_artifacts(run.info.run_id, "samples.json", str(tmp_path))
    table = json.loads(Path(artefact).read_text())
    assert table["columns"] == ["step", "prompt", "reference", "generation", "exact"]
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["step"] for r in rows] == [0] * 4 + [3] * 4 + [6] * 4
    local = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows == local
    eval_rows = [json.loads(line)["response"] for line in (ROOT / "data/tiny/eval.jsonl").open()][:4]
    assert [r["reference"] for r in rows] == eval_rows * 3
    assert "eval/exact_match" in run.data.metrics and summary["sample_prompts"] == 4


@pytest.mark.integration
def test_no_credential_reaches_params_tags_artefacts_or_logs(
    mlflow_server: MlflowServer,
    two_worker_run: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    out, proc = two_worker_run
    run_id = json.loads((out / "summary.json").read_text())["mlflow_run_id"]
    client = _client(mlflow_server.uri)
    run = client.get_run(run_id)
    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    texts = [proc.stdout, proc.stderr, json.dumps(run.data.params), json.dumps(run.data.tags)]
    texts += [p.read_bytes().decode("latin-1") for p in downloaded.rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    assert len(texts) > 10
    assert not [t for t in texts if SECRET in t]


@pytest.mark.integration
def test_cli_runs_lists_and_compares_the_run(
    mlflow_server: MlflowServer, two_worker_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    out, _ = two_worker_run
    summary = json.loads((out / "summary.json").read_text())
    table = run_cli("runs", "--uri", mlflow_server.uri, "--experiment", "two-workers").stdout
    header, _, line = table.splitlines()[:3]
    assert header.split()[:3] == ["name", "run", "id"]
    cells = line.split()
    assert cells[:3] == ["run", summary["mlflow_run_id"], "FINISHED"] and cells[5] == "6"
    assert float(cells[6]) == pytest.approx(summary["train_loss_last"], rel=1e-3)
    assert float(cells[8]) == pytest.approx(summary["tokens_per_s"], rel=1e-3)


@pytest.mark.integration
def test_a_killed_and_restarted_job_continues_the_same_run(
    mlflow_server: MlflowServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL a job once its params and first loss are logged (its run stays RUNNING); restart it with the
    run id. The sender sends metric rows before queued tasks, so the params may arrive after the first
    loss; and the job is long, so that it is still training when they have."""
    first = _server_config(
        tiny_model_dir, tmp_path / "run", mlflow_server.uri, "resume", "train.max_steps=1000"
    )
    job = _start_job(first, tmp_path / "first.yaml")
    client = _client(mlflow_server.uri)
    try:
        _wait_for(
            lambda: _first_loss_arrived(client, "resume", with_params=True), job,
            "the params and the first loss to reach the server",
        )  # fmt: skip
    finally:
        job.kill()
        job.wait()
    (killed,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert killed.info.status == "RUNNING"
    steps_before = [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")]
    again = _server_config(tiny_model_dir, tmp_path / "run", mlflow_server.uri, "resume", "train.max_steps=2",
                           f"tracking.run_id={killed.info.run_id}")  # fmt: skip
    proc = run_cli("train", str(write_config(again, tmp_path / "again.yaml")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mlflow_run_id"] == killed.info.run_id
    assert "resumed with changed params (kept as first logged): train.max_steps" in proc.stderr
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["riemann_tune.resumes"] == "1"
    assert run.data.params["train.max_steps"] == "1000"
    assert len(client.search_runs([run.info.experiment_id])) == 1, "no second run"
    # Without a checkpoint to restore (not this test's subject) the second job starts again at step 1.
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps_before and steps == sorted([*steps_before, 1, 2])


def _start_job(cfg: RunConfig, path: Path) -> subprocess.Popen[str]:
    """``launch train`` in the background, its output in ``path``.log (a pipe nobody reads could fill)."""
    cmd = [sys.executable, "-m", "launch", "train", str(write_config(cfg, path))]
    with path.with_suffix(".log").open("w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.mark.integration
def test_a_server_outage_mid_run_loses_no_metric(
    mlflow_server: MlflowServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Kill the server as soon as the run's first loss arrives; restart it a few steps later.

    Long enough that the run is still going when the first loss reaches the server on a loaded machine
    (with 24 steps it had once finished by then)."""
    out = tmp_path / "run"
    steps = 120
    cfg = _server_config(tiny_model_dir, out, mlflow_server.uri, "outage", f"train.max_steps={steps}")
    job = _start_job(cfg, tmp_path / "cfg.yaml")
    try:
        client = _client(mlflow_server.uri)
        _wait_for(lambda: _first_loss_arrived(client, "outage"), job, "the first loss to reach the server")
        mlflow_server.stop()
        at_outage = len(_rows(out))
        _wait_for(
            lambda: len(_rows(out)) >= at_outage + 3 or job.poll() is not None, job, "steps in the outage"
        )
        rows_in_outage = len(_rows(out)) - at_outage
        mlflow_server.start()
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    output = (tmp_path / "cfg.log").read_text()
    assert job.returncode == 0, output[-5000:]
    assert rows_in_outage >= 3, "steps ran while the server was down"
    assert "retrying in the background" in output and "reachable again" in output
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["mlflow_metric_rows"] == len(_rows(out)) == steps + 1
        and summary["mlflow_metric_rows_dropped"] == 0
    )
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    _assert_histories_match_jsonl(client, run.info.run_id, _rows(out))
    assert {"summary.json", "loss_curve.png", "adapter"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }


def _first_loss_arrived(client: Any, experiment: str, with_params: bool = False) -> bool:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if not runs or (with_params and "train.max_steps" not in runs[0].data.params):
        return False
    return bool(client.get_metric_history(runs[0].info.run_id, "train/loss"))


def _wait_for(condition: Callable[[], bool], job: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if job.poll() is not None and not condition():
            raise AssertionError(f"the job ended (code {job.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.integration
def test_a_server_unreachable_from_the_start_never_stops_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = _server_config(tiny_model_dir, out, f"http://127.0.0.1:{free_port()}", "nowhere",
                         "train.max_steps=3", "tracking.drain_timeout_s=1")  # fmt: skip
    proc = run_cli("train", str(write_config(cfg, tmp_path / "cfg.yaml")))
    assert "connect failed (MlflowException: cannot connect: [Errno 111] Connection refused)" in proc.stderr
    assert "was unreachable for the whole run" in proc.stderr
    assert "metrics.jsonl holds them all" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["mlflow_run_id"] is None
    # eval at step 0, then 3 steps
    assert summary["mlflow_metric_rows_dropped"] == summary["mlflow_metric_rows"] == len(_rows(out)) == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()
