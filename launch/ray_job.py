"""The Ray backend: a Ray Train TorchTrainer whose workers run ``trainer.worker.run_worker``.

This is the only module that imports ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.backend import Backend, BackendConfig
from ray.train.torch import TorchConfig, TorchTrainer

from trainer.config import RunConfig
from trainer.resume import TrainerState, latest_usable, write_manifest
from trainer.worker import run_worker

log = logging.getLogger(__name__)


class RaySink:
    """Each rank stages its shards in a node-local temp dir and writes a manifest of them; ray.train.report
    gathers every rank's directory into one checkpoint under Ray's storage path (<output.dir>/checkpoints)."""

    def __init__(self, hashes: bool) -> None:
        self.local = Path(tempfile.mkdtemp(prefix="riemann-tune-ckpt-"))
        self.hashes = hashes

    def staging_dir(self, step: int) -> Path:
        return self.local / f"step_{step:08d}"

    def seal(self, staged: Path, state: TrainerState, metrics: dict[str, float]) -> None:
        ctx = ray.train.get_context()
        if ctx.get_world_rank() == 0:
            state.manifests = [f"manifest-rank{r}.json" for r in range(ctx.get_world_size())]
            state.write(staged)
        write_manifest(staged, f"manifest-rank{ctx.get_world_rank()}.json", self.hashes)
        ray.train.report({**metrics, "step": state.step}, checkpoint=Checkpoint.from_directory(str(staged)))
        shutil.rmtree(staged, ignore_errors=True)


def _join_file_store(url: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world_size)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _FileStoreBackend(Backend):
    """Sets up gloo through a FileStore: for clusters on one machine (see _LocalTorchConfig)."""

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        assert isinstance(backend_config, _LocalTorchConfig)
        # A FileStore serves one rendezvous: every start of the worker group (Ray restarts it after a
        # failure) meets through a new file.
        store = Path(backend_config.store_dir) / f".rendezvous-{uuid.uuid4().hex}"
        n, url = len(worker_group), f"file://{store}"
        ray.get([worker_group.execute_single_async(i, _join_file_store, url, i, n) for i in range(n)])

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        worker_group.execute(_leave_group)


@dataclass
class _LocalTorchConfig(TorchConfig):
    """A local cluster's process group meets through a FileStore, not Ray's default TCP store: torch's TCP
    store reverse-resolves every peer address (DNS queries, even for 127.0.0.1); a file needs no network."""

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
    cfg = RunConfig.model_validate(loop_config["config"])
    # After a failure Ray restarts the workers. They continue from the newest whole checkpoint of this
    # launch on disk rather than from ray.train.get_checkpoint(): Ray registers a reported checkpoint
    # asynchronously, and a failure right after a report can lose the registration, not the files.
    restart_from = latest_usable(cfg.checkpoint_root / loop_config["run_name"])
    run_worker(
        cfg, RaySink(cfg.checkpoint.verify_hashes), launcher="ray", job_id=loop_config["job_id"],
        resume_from=restart_from,
    )  # fmt: skip


@contextlib.contextmanager
def _local_cluster_home(root: Path) -> Iterator[None]:
    """Start local Ray processes with a HOME holding ray_bootstrap_config.yaml.

    Without that file Ray's dashboard probes cloud metadata addresses (169.254.169.254, ...) even with
    usage stats off; with it, Ray knows it runs on a local provider and stays on 127.0.0.1.
    """
    home = root / "ray-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if old is not None:
            os.environ["HOME"] = old


def run_ray(cfg: RunConfig, env: dict[str, str], job_id: str) -> None:
    """Run ``cfg`` as a Ray Train job, on ``distributed.ray_address`` or a local cluster it starts."""
    d = cfg.distributed
    runtime_env = {"env_vars": env}
    torch_config = TorchConfig()
    if d.ray_address:
        ray.init(address=d.ray_address, runtime_env=runtime_env, log_to_driver=True)
    else:
        torch_config = _LocalTorchConfig(backend="gloo", store_dir=cfg.output.dir)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        cpus = max(os.cpu_count() or 1, int(d.num_workers * d.cpus_per_worker) + 1)
        with _local_cluster_home(Path(cfg.output.dir).parent / ".ray"):
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                log_to_driver=True,
            )
    try:
        use_gpu = bool(d.use_gpu)
        # One Ray run per launch: Ray would otherwise restore a same-named run by itself; resuming
        # across launches is the config's decision (resume=auto finds checkpoints of any launch).
        run_name = f"{Path(cfg.output.dir).name}-{job_id[:8]}"
        trainer = TorchTrainer(
            _train_fn,
            torch_config=torch_config,
            train_loop_config={"config": cfg.model_dump(mode="json"), "job_id": job_id, "run_name": run_name},
            scaling_config=ScalingConfig(
                num_workers=d.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": d.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=str(cfg.checkpoint_root),
                failure_config=FailureConfig(max_failures=d.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            ),
        )
        trainer.fit()
    finally:
        ray.shutdown()
