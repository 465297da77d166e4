"""The demo config end to end: 2 Ray workers, ZeRO-2, 4-bit base, LoRA, scaled AdamW, MLflow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import DEMO_CONFIG, ROOT, outbound_connects, run_cli

pytestmark = pytest.mark.slow

GOLDEN = ROOT / "tests" / "golden" / "tiny-cpu.loss"


# The data (and batch shape) the golden losses were written with, before the demo moved to its
# synthetic task: the file pins the numerics of wave 1's demo, which these overrides reproduce.
GOLDEN_DATA = (
    "data.train_path=data/tiny/train.jsonl", "data.eval_path=data/tiny/eval.jsonl", "data.max_seq_len=192",
    "train.micro_batch_size=8", "optim.lr=1e-2", "train.sample_prompts=0",
)  # fmt: skip

STRACE = shutil.which("strace")
CHROMIUM = shutil.which("chromium")
RUN_NAME = "demo-end-to-end"
STEPS = 300  # configs/tiny-cpu.yaml's train.max_steps
MARGIN = 0.5  # exact match the demo must reach: a majority (measured 0.72-0.98 over seeds 0-3)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo as `make demo` runs it (2 Ray workers, its 300 steps), into a temporary directory and
    store, every process traced for connect() if strace exists."""
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "run"
    prefix = (
        (STRACE, "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(tmp / "connects.log"))
        if STRACE
        else ()
    )
    proc = run_cli(
        "train", str(DEMO_CONFIG), f"output.dir={out}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.run_name={RUN_NAME}",
        prefix=prefix,
    )  # fmt: skip
    (tmp / "output.log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it where it can)")
def test_nothing_leaves_loopback(demo_run: Path) -> None:
    """Ray, DeepSpeed, datasets, MLflow: no process of the run connects beyond 127.0.0.1, DNS included."""
    log = demo_run.parent / "connects.log"
    assert "AF_INET" in log.read_text(), "the trace saw no socket at all: strace did not follow the run"
    assert outbound_connects(log) == []


def test_output_reads_as_a_run_log(demo_run: Path) -> None:
    """The progress and the summary, not Ray's complaint of a State API that the demo does not start."""
    from launch.ray_job import NO_STATE_API_NOISE

    output = (demo_run.parent / "output.log").read_text()
    assert f"done: {STEPS} steps" in output and "train:" in output and "exact match" in output
    for noise in (NO_STATE_API_NOISE, "TrainController", "PreemptionWatcher", "built successfully",
                  "TrainingReport(", "Token authentication", "checkpoint_"):  # fmt: skip
        assert noise not in output, noise
    assert "TrainController" in (demo_run / "ray.log").read_text(), "held back, not lost"


def test_summary_and_loss(demo_run: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    assert summary["eval_loss"] < summary["eval_loss_first"] - 0.02
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["tokens_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["preconditioner_fallbacks"] == 0
    assert (demo_run / "config.yaml").is_file()
    assert {p.name for p in (demo_run / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_the_demo_learns_its_task(demo_run: Path) -> None:
    """The demo sorts held-out word triples: greedy exact match over all 64 eval prompts goes from none
    before training to a majority after (measured on this machine's 2 cores: 75, 98, 92 and 72% for
    seeds 0-3; a run that fails to learn answers every prompt with one fixed order, under 10%). The bar
    is MARGIN, below every seed's measurement: a run whose bf16 reductions differ lands elsewhere among
    them."""
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["sample_prompts"] == 64
    assert summary["exact_match_first"] == 0.0
    assert summary["exact_match"] >= MARGIN, summary["samples_last"]
    rows = [json.loads(line) for line in (demo_run / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == list(range(0, STEPS + 1, 50)) and len(rows) == 64 * 7


def test_mlflow_run_agrees_with_summary(demo_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    summary = json.loads((demo_run / "summary.json").read_text())
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tiny-cpu"
    assert len(client.search_runs([experiment.experiment_id])) == 1, "one job, one MLflow run"
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter.rank"] == "8" and run.data.params["optim.preconditioner"] == "riemannian"
    assert run.data.tags["world_size"] == "2" and run.data.tags["launcher"] == "ray"
    assert run.data.tags["ray_job_id"] and summary["mlflow_metric_rows_dropped"] == 0
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(1, STEPS + 1))
    assert losses[-1].value == pytest.approx(summary["train_loss_last"])
    assert run.data.metrics["eval/loss"] == pytest.approx(summary["eval_loss"])
    for name in ("train/tokens_per_s", "train/lr", "train/grad_norm"):
        assert name in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "adapter"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {
        "adapter/adapter_model.safetensors"
    }


def test_checkpoints_reported_through_ray(demo_run: Path) -> None:
    checkpoints = sorted(p for p in (demo_run / "checkpoints").rglob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    assert any(checkpoints[-1].rglob("*optim_states.pt")), "optimizer shards missing from the checkpoint"


def test_peft_loads_the_adapter_with_the_same_logits(demo_run: Path) -> None:
    from peft import PeftModel

    from trainer import config as config_lib
    from trainer.export import load_adapter_state, read_adapter
    from trainer.model import guard_4bit_gradients, load_base_model, prepare_model

    cfg = config_lib.load(demo_run / "config.yaml", ["train.dtype=fp32"])
    ours = prepare_model(cfg, torch.device("cpu")).eval()
    _, _, _, tensors = read_adapter(demo_run / "adapter")
    assert max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k) > 0, "untrained adapter"
    load_adapter_state(ours, tensors)
    base = load_base_model(cfg.model, torch.float32, torch.device("cpu"))
    guard_4bit_gradients(base)
    theirs = PeftModel.from_pretrained(base, str(demo_run / "adapter")).eval()
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_golden_losses(tmp_path: Path) -> None:
    """The first steps of the demo config under its seed, on the shipped text-and-instruction data
    (data/tiny; the demo itself trains on its synthetic task), reproduce tests/golden/tiny-cpu.loss.

    Run as one process with twice the accumulation (the demo's global batches, without Ray's start-up).
    bf16 compute on a 4-bit base: kernels may round differently on another CPU, hence 2e-3 absolute;
    a numerics change (loss scale, preconditioner, data order) moves the losses by far more.
    Regenerate with UPDATE_GOLDEN=1 after an intended change, and say why in the commit.
    The tiny base comes from the shared cache (.cache/models/tiny-llama); one built from another
    model.build, corpus or builder code is refused (trainer.model.tiny.check_built_from), so these losses
    are always those of the base the demo's spec builds today.
    """
    out = tmp_path / "golden"
    run_cli(
        "train", str(DEMO_CONFIG),
        *GOLDEN_DATA, "distributed.backend=local", "distributed.num_workers=1", "train.grad_accum_steps=2",
        "train.max_steps=8", "tracking.enabled=false", "checkpoint.every_n_steps=0", f"output.dir={out}",
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(f"{step} {loss:.6f}\n" for step, loss in losses))
    golden = [(int(s), float(v)) for s, v in (line.split() for line in GOLDEN.read_text().splitlines())]
    assert [s for s, _ in losses] == [s for s, _ in golden]
    for (step, got), (_, want) in zip(losses, golden, strict=True):
        assert got == pytest.approx(want, abs=2e-3), f"step {step}: loss {got:.6f} != golden {want:.6f}"


def test_a_bad_row_under_ray_ends_with_its_one_line_and_exit_2(tmp_path: Path) -> None:
    """The worker's DataError reaches the terminal as its message alone, with exit code 2, not as three
    tracebacks (worker, controller, driver); the worker's traceback stays in the run's ray.log."""
    import subprocess
    import sys

    bad = tmp_path / "train.jsonl"
    rows = (ROOT / "data" / "tiny" / "train.jsonl").read_text().splitlines()[:8]
    bad.write_text("\n".join([*rows, json.dumps({"instruction": 5, "response": "x"})]) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "train", str(DEMO_CONFIG), f"data.train_path={bad}",
         "train.max_steps=2", "tracking.enabled=false", f"output.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    message = f"error: {bad}: row 9: field 'instruction' must be a string, got int"
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    assert "raise DataError" in (out / "ray.log").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it where it can)")
def test_the_mlflow_ui_renders_the_run(demo_run: Path) -> None:
    """The MLflow UI, served over the demo's store and opened in headless Chromium, renders the run's page
    (what scripts/mlflow_screenshot.py photographs for the README)."""
    from mlflow.tracking import MlflowClient

    from scripts.mlflow_screenshot import browse, page_url
    from tests.mlflow_server import MlflowServer

    summary = json.loads((demo_run / "summary.json").read_text())
    store = demo_run.parent / "mlflow.db"
    run = MlflowClient(f"sqlite:///{store}").get_run(summary["mlflow_run_id"])
    (demo_run.parent / "ui").mkdir(exist_ok=True)
    with MlflowServer(demo_run.parent / "ui", store=store) as server:
        dom = browse(page_url(server, run.info.experiment_id, run.info.run_id, "metrics"))
    assert RUN_NAME in dom, dom[-2000:]
