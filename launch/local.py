"""The local backend: this process, or N worker processes on this machine.

N processes meet through a FileStore in the output directory rather than a TCP store: everything stays
on this machine, and nothing looks up a host name (torch's TCP store reverse-resolves its peers, which
sends DNS queries even for 127.0.0.1). gloo talks over the loopback interface. For several machines
without Ray, use torchrun (slurm/multinode-deepspeed.sbatch): each worker then joins with env://.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from launch.errors import USAGE_EXIT, ReportedError
from trainer import config as config_lib
from trainer.config import RunConfig
from trainer.device import check_gpu_count, resolve_use_gpu, select_accelerator

INIT_METHOD_ENV = "RIEMANN_TUNE_INIT_METHOD"  # how a spawned worker learns where to meet its peers


def run_local(cfg: RunConfig) -> dict[str, Any] | None:
    """Run in-process when this is a worker (world of one, or spawned/torchrun), else spawn N workers.

    ``use_gpu: null`` is resolved here, once, from this machine, and the spawned workers get the answer;
    N workers on GPUs need N GPUs (each takes GPU number LOCAL_RANK).
    """
    spawned = "RANK" in os.environ
    use_gpu = resolve_use_gpu(cfg.distributed.use_gpu)
    if use_gpu and not spawned:  # a spawned worker checks its own LOCAL_RANK (trainer.device)
        import torch

        check_gpu_count(cfg.distributed.num_workers, 1, torch.cuda.device_count(), "this machine")
    if cfg.distributed.num_workers == 1 or spawned:
        select_accelerator(use_gpu)  # before trainer.worker imports DeepSpeed
        # Imported here: a launcher that only spawns workers need not load torch's training stack.
        from trainer.checkpoints import DirectorySink
        from trainer.worker import run_worker

        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "local"
        try:
            summary = run_worker(
                cfg, DirectorySink(cfg), launcher=launcher, init_method=os.environ.get(INIT_METHOD_ENV)
            )
            leave_process_group(together=True)
            return summary
        except BaseException:
            leave_process_group(together=False)
            raise
    spawn_workers(with_use_gpu(cfg, use_gpu))
    return None


def with_use_gpu(cfg: RunConfig, use_gpu: bool) -> RunConfig:
    """``cfg`` with ``distributed.use_gpu`` resolved: workers must not decide it again, elsewhere."""
    return cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"use_gpu": use_gpu})})


def leave_process_group(together: bool = False) -> None:
    """Close the process group before the interpreter exits: left to exit-time destructors, gloo's
    threads can abort a rank whose peer has already gone ("terminate called without an active
    exception"), failing a run that finished. ``together``: wait for every rank first."""
    import torch.distributed as dist

    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def spawn_workers(cfg: RunConfig) -> None:
    """Start ``num_workers`` copies of this command as ranks 0..N-1; if one fails, stop the others."""
    n = cfg.distributed.num_workers
    out = Path(cfg.output.dir)
    config_path = out / f".config-{uuid.uuid4().hex}.yaml"
    store = out / f".rendezvous-{uuid.uuid4().hex}"
    config_path.write_text(config_lib.to_yaml(cfg))
    procs = []
    try:
        for rank in range(n):
            env = {
                "OMP_NUM_THREADS": str(_threads_per_worker(n)),  # unless the user set it
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n),
                "MASTER_ADDR": "127.0.0.1",
                INIT_METHOD_ENV: f"file://{store}",
                "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
            }
            cmd = [sys.executable, "-m", "launch", "train", str(config_path)]
            procs.append(subprocess.Popen(cmd, env=env))
        _wait_all(procs)
    finally:
        config_path.unlink(missing_ok=True)
        store.unlink(missing_ok=True)


def _threads_per_worker(workers: int) -> int:
    """This machine's cores shared out: N workers each running a thread per core would oversubscribe it
    N times over (torchrun sets 1 for the same reason)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
            rank, code = failed[0]
            if code == USAGE_EXIT:  # the worker printed the user's error; the others were stopped
                raise ReportedError(f"worker rank {rank}: a usage error")
            raise RuntimeError(f"worker rank {rank} exited with code {code}; the other workers were stopped")
        if all(c == 0 for c in codes):
            return
        time.sleep(0.2)
