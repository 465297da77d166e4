"""The Ray backend: a Ray Train TorchTrainer whose workers run ``trainer.worker.run_worker``, on a local
cluster it starts or on a cluster it joins; and the submission of a run as a Ray Job.

This is the only module that imports ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.backend import Backend, BackendConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from launch.env import is_loopback
from launch.local import leave_process_group, with_use_gpu
from trainer.checkpoints import TrainerState, latest_usable, write_manifest
from trainer.config import RunConfig
from trainer.device import check_gpu_count, select_accelerator

log = logging.getLogger(__name__)


class RaySink:
    """Each rank stages its shards in a node-local temp dir and writes a manifest of them; ray.train.report
    gathers every rank's directory into one checkpoint under Ray's storage path (<output.dir>/checkpoints)."""

    def __init__(self, hashes: bool) -> None:
        self.local = Path(tempfile.mkdtemp(prefix="riemann-tune-ckpt-"))
        self.hashes = hashes
        self.last_eval: dict[str, float] = {}  # what report_eval last sent: every later report repeats it

    def __enter__(self) -> RaySink:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.local, ignore_errors=True)

    def staging_dir(self, step: int) -> Path:
        return self.local / f"step_{step:08d}"

    def seal(self, staged: Path, state: TrainerState, metrics: dict[str, float]) -> None:
        ctx = ray.train.get_context()
        if ctx.get_world_rank() == 0:
            state.manifests = [f"manifest-rank{r}.json" for r in range(ctx.get_world_size())]
            state.write(staged)
        write_manifest(staged, f"manifest-rank{ctx.get_world_rank()}.json", self.hashes)
        report = {**metrics, **self.last_eval, "step": state.step}
        ray.train.report(report, checkpoint=Checkpoint.from_directory(str(staged)))
        shutil.rmtree(staged, ignore_errors=True)

    def report_eval(self, step: int, eval_loss: float) -> None:
        """Report an evaluation to Ray (a sweep's scheduler stops hopeless trials on it). Every rank
        calls it at the same steps, as Ray Train wants of every report."""
        self.last_eval = {TRIAL_METRIC: eval_loss}
        ray.train.report({**self.last_eval, "step": step})


TRIAL_METRIC = "trial_eval_loss"  # the eval loss as a sweep's trials report it to Ray Tune


def _join_file_store(url: str, backend: str, rank: int, world_size: int, timeout_s: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    # Every peer is on this machine: gloo's pairs talk over loopback, never through a looked-up hostname.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=world_size, timeout=timeout)


class _FileStoreBackend(Backend):
    """Sets up the process group through a FileStore: for clusters on one machine (see _LocalTorchConfig)."""

    share_cuda_visible_devices: bool = True  # as Ray's torch backend: each worker sees the node's GPUs

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        assert isinstance(backend_config, _LocalTorchConfig)
        # A FileStore serves one rendezvous: every start of the worker group (Ray restarts it after a
        # failure) meets through a new file.
        store = Path(backend_config.store_dir) / f".rendezvous-{uuid.uuid4().hex}"
        n, url, backend = len(worker_group), f"file://{store}", backend_config.backend
        timeout = backend_config.timeout_s
        ray.get(
            [
                worker_group.execute_single_async(i, _join_file_store, url, backend, i, n, timeout)
                for i in range(n)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        worker_group.execute(leave_process_group)


@dataclass
class _LocalTorchConfig(TorchConfig):
    """The process group of a cluster on one machine meets through a FileStore, not Ray's default TCP
    store: torch's TCP store reverse-resolves every peer address (DNS queries, even for 127.0.0.1); a file
    needs no network. The file lies in the output directory, which every worker sees."""

    store_dir: str = ""

    @property
    def backend_cls(self) -> type[Backend]:
        return _FileStoreBackend


def _train_fn(loop_config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    # DeepSpeed and our device choice read the torchrun-style variables.
    os.environ.update(
        RANK=str(ctx.get_world_rank()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        RIEMANN_TUNE_RAY_JOB_ID=ray.get_runtime_context().get_job_id(),  # the run's ray_job_id tag
    )
    # Where each rank landed, in the worker's log (Ray forwards it to the driver): placement made visible.
    # Not print(): Ray Train also copies printed lines into its own log, so each would show twice.
    node = ray.get_runtime_context().get_node_id()
    sys.stdout.write(
        f"riemann-tune: rank {ctx.get_world_rank()} of {ctx.get_world_size()} on Ray node {node}\n"
    )
    sys.stdout.flush()
    cfg = RunConfig.model_validate(loop_config["config"])
    use_gpu = bool(cfg.distributed.use_gpu)  # resolved by the driver (run_ray)
    select_accelerator(use_gpu)  # before trainer.worker imports DeepSpeed
    from trainer.worker import run_worker  # here: the driver never trains, and need not load DeepSpeed

    # Ray's device for this worker: its own GPU among those the node shares, not LOCAL_RANK's.
    device = get_device() if use_gpu else None
    # After a failure Ray restarts the workers. They continue from the newest whole checkpoint of this
    # launch on disk rather than from ray.train.get_checkpoint(): Ray registers a reported checkpoint
    # asynchronously, and a failure right after a report can lose the registration, not the files.
    restart_from = latest_usable(cfg.checkpoint_root / loop_config["run_name"])
    with RaySink(cfg.checkpoint.verify_hashes) as sink:
        on_eval = sink.report_eval if loop_config.get("report_evals") else None
        run_worker(
            cfg, sink, launcher="ray", job_id=loop_config["job_id"], resume_from=restart_from, device=device,
            on_eval=on_eval,
        )  # fmt: skip


@contextlib.contextmanager
def _local_cluster_home(root: Path) -> Iterator[None]:
    """Start local Ray processes with a HOME holding ray_bootstrap_config.yaml.

    Without that file Ray's dashboard probes cloud metadata addresses (169.254.169.254, ...) even with
    usage stats off; with it, Ray knows it runs on a local provider and stays on 127.0.0.1. The workers
    inherit that HOME, so the user's cache directory is pinned first: DeepSpeed's compiled CPU op, the
    tokenised datasets and matplotlib's font list then outlive the run (a fresh HOME rebuilt them all).
    """
    home = root / "ray-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    os.environ.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # where it was under the old HOME
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if old is not None:
            os.environ["HOME"] = old


def _nodes_on_this_machine() -> bool:
    """Whether every alive node of the connected cluster runs on this machine: all on loopback, or all
    reporting this host's name (no name lookup either way)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = socket.gethostname()
    return all(is_loopback(n["NodeManagerAddress"]) for n in nodes) or all(
        n.get("NodeManagerHostname") == here for n in nodes
    )


def connect(cfg: RunConfig, env: dict[str, str], concurrent_runs: int = 1) -> None:
    """ray.init on the configured cluster, or on a new local one bound to loopback, with CPUs enough for
    ``concurrent_runs`` runs of ``cfg`` (a sweep's trials) however few cores the machine has."""
    d = cfg.distributed
    if d.ray_address:
        ray.init(address=d.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(concurrent_runs * d.num_workers * d.cpus_per_worker) + 1)
        # "Token authentication is enabled for this Ray cluster": it is, and it should be; nothing to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        with _local_cluster_home(Path(cfg.output.dir).parent / ".ray"):
            ray.init(
                num_cpus=cpus,
                include_dashboard=d.ray_dashboard,
                dashboard_host=d.ray_dashboard_host,
                _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": env},
                log_to_driver=True,
            )
    _route_worker_lines(Path(cfg.output.dir) / RAY_LOG)  # on a joined cluster too


RAY_LOG = "ray.log"
"""Where the lines of Ray's own actors go, in the output directory, instead of the terminal."""

# Ray Train's own actors: the controller (resource requests, retries, each failure's traceback again),
# the placement-group cleaner (without a dashboard it fails to ask the State API every second) and the
# preemption watcher. Nothing they print is for the user to act on; the run's outcome reaches the driver.
RAY_INTERNAL_ACTORS = frozenset(
    {
        "TrainController",
        "PlacementGroupCleaner",
        "PreemptionWatcher",
        "SynchronizationActor",
        "TrainStateActor",
    }
)
NO_STATE_API_NOISE = "Failed to query Ray Train Controller actor state"
# What Ray Train's code in our workers logs at each report: checkpoint paths and TrainingReport reprs.
RAY_WORKER_CHATTER = (
    NO_STATE_API_NOISE,
    "Checkpoint successfully created at",
    "Reporting training result",
    "Reported metrics:",
    "shm_comm_op built successfully",  # DeepSpeed, at every load of its CPU op (a real compile is logged)
)
WORKER_TRACEBACK = "Error in training function:"
"""Ray's worker logs a failing train function's traceback under this line; the driver reports the error."""


class WorkerLines:
    """Decides, line by line, what of the workers' output reaches the terminal: the run's log, not Ray's
    internals. What it holds back goes to ``log_file``, prefixed with the process it came from."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self._in_traceback: set[Any] = set()  # pids inside a traceback block

    def split(self, data: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(lines to show, lines to hold back) of one batch from Ray's log monitor."""
        lines: list[str] = data.get("lines", [])
        if data.get("actor_name") in RAY_INTERNAL_ACTORS:
            return [], lines
        shown, held = [], []
        pid = data.get("pid")
        for line in lines:
            if WORKER_TRACEBACK in line:
                self._in_traceback.add(pid)
            if pid in self._in_traceback or any(text in line for text in RAY_WORKER_CHATTER):
                held.append(line)
                if _ends_traceback(line):
                    self._in_traceback.discard(pid)
            else:
                shown.append(line)
        return shown, held

    def hold(self, data: dict[str, Any], lines: list[str]) -> None:
        source = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        with self.log_file.open("a") as f:
            f.write("".join(f"{source} {line}\n" for line in lines))


def _ends_traceback(line: str) -> bool:
    """The exception line that ends a Python traceback: ``pkg.module.SomeError: message``."""
    head = line.split(":", 1)[0]
    return (
        bool(head)
        and not line.startswith(" ")
        and head.replace(".", "").isidentifier()
        and (head.endswith(("Error", "Exception", "Interrupt", "Exit")) or head.endswith("Failure"))
    )


def _route_worker_lines(log_file: Path) -> None:
    """Route worker lines through ``WorkerLines`` on their way to this driver's output (Ray 2.60's log
    dispatcher, a private API: if it is not there, every line is shown as before)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    router = WorkerLines(log_file)
    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs":
            continue

        def routed(data: dict[str, Any], show: Any = handler) -> None:
            shown, held = router.split(data)
            if held:
                router.hold(data, held)
            if shown:
                show({**data, "lines": shown})

        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, routed)


def _rendezvous(cfg: RunConfig, use_gpu: bool) -> TorchConfig:
    """A file store in the output directory when every node is on this machine, else Ray's TCP store."""
    backend = "nccl" if use_gpu else "gloo"
    timeout_s = math.ceil(cfg.distributed.collective_timeout_s)
    if cfg.distributed.ray_address and not _nodes_on_this_machine():
        log.info("the Ray cluster spans several machines: workers meet through Ray's TCP store")
        return TorchConfig(backend=backend, timeout_s=timeout_s)
    log.info("every node of the Ray cluster is on this machine: workers meet through a file store")
    return _LocalTorchConfig(backend=backend, timeout_s=timeout_s, store_dir=cfg.output.dir)


def _scaling(cfg: RunConfig, use_gpu: bool) -> ScalingConfig:
    d = cfg.distributed
    resources = {"CPU": d.cpus_per_worker} | ({"GPU": d.gpus_per_worker} if use_gpu else {})
    return ScalingConfig(
        num_workers=d.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        placement_strategy=d.placement_strategy,
    )


def cluster_use_gpu(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``distributed.use_gpu`` resolved against the connected cluster (null: GPUs when the
    cluster has any; the driver's own node may have none), once, for every worker; GPUs it asks for
    must exist (Ray would wait forever for them)."""
    d = cfg.distributed
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = d.use_gpu if d.use_gpu is not None else gpus > 0
    if use_gpu:
        check_gpu_count(d.num_workers, d.gpus_per_worker, gpus, "the Ray cluster")
    return with_use_gpu(cfg, use_gpu)


def build_trainer(
    cfg: RunConfig, job_id: str, run_name: str, callbacks: list[Any] | None = None, report_evals: bool = False
) -> TorchTrainer:
    """The TorchTrainer of one run of ``cfg`` (``use_gpu`` resolved): the workers run
    ``trainer.worker.run_worker``; Ray keeps its state under ``<output.dir>/checkpoints/<run_name>``.
    ``callbacks``: Ray Train callbacks (a sweep's, to Tune); ``report_evals``: report every eval loss."""
    d, use_gpu = cfg.distributed, bool(cfg.distributed.use_gpu)
    loop_config = {"config": cfg.model_dump(mode="json"), "job_id": job_id, "run_name": run_name}
    return TorchTrainer(
        _train_fn,
        torch_config=_rendezvous(cfg, use_gpu),
        train_loop_config=loop_config | {"report_evals": report_evals},
        scaling_config=_scaling(cfg, use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(cfg.checkpoint_root),
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            callbacks=callbacks,
        ),
    )


def warn_open_dashboard(cfg: RunConfig) -> None:
    d = cfg.distributed
    if d.ray_dashboard and not d.ray_address and not is_loopback(d.ray_dashboard_host):
        log.warning(
            "distributed.ray_dashboard_host=%s: the dashboard and Jobs API accept code from anyone who "
            "reaches them (CVE-2023-48022)",
            d.ray_dashboard_host,
        )


def run_ray(cfg: RunConfig, env: dict[str, str], job_id: str) -> None:
    """Run ``cfg`` as a Ray Train job, on ``distributed.ray_address`` or a local cluster it starts."""
    warn_open_dashboard(cfg)
    connect(cfg, env)
    try:
        cfg = cluster_use_gpu(cfg)
        # One Ray run per launch: Ray would otherwise restore a same-named run by itself; resuming
        # across launches is the config's decision (resume=auto finds checkpoints of any launch).
        build_trainer(cfg, job_id, run_name=f"{Path(cfg.output.dir).name}-{job_id[:8]}").fit()
    finally:
        ray.shutdown()


def submit_job(address: str, entrypoint: str, working_dir: Path, excludes: list[str], wait: bool) -> int:
    """Submit ``entrypoint`` as a Ray Job running in a copy of ``working_dir``; with ``wait``, follow its
    logs until it ends. Returns 0 when the job succeeded (or was only submitted), else 1."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": str(working_dir), "excludes": excludes}
    )
    print(f"submitted Ray job {job_id} to {address}", flush=True)
    if not wait:
        return 0
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status.is_terminal():
            print(f"Ray job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)
