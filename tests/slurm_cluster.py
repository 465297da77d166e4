"""A one-node Slurm on localhost for tests: munged, slurmctld and slurmd with their own key, config,
state and ports in a temporary directory (nothing under /etc is read or written), stopped at the end."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.mlflow_server import free_port
from tests.processes import Daemon, traced

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")

# cred_expire: a requeued job may start again only once its previous credential expired (default 120 s).
CONF = """\
ClusterName=riemann
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket,cred_expire=20
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# a requeued job starts at the scheduler's periodic pass: every 60 s by default, 2 s here
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
FirstJobId={first_job}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


class SlurmCluster:
    """Start with ``start()``; ``env`` is what sbatch/scontrol need (SLURM_CONF); ``stop()`` ends it all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[Daemon] = []

    def start(self) -> None:
        for d in ("munge", "state", "spool"):
            (self.root / d).mkdir(mode=0o700)
        (self.root / "munge").chmod(0o755)  # munged insists its socket's directory is reachable
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(CONF.format(
            root=self.root, ctld_port=free_port(), d_port=free_port(),
            first_job=random.randint(10_000, 90_000), cpus=os.cpu_count() or 1,
        ))  # fmt: skip
        m = self.root / "munge"
        self._daemon("munged", [
            "munged", "-F", "-f", f"--socket={m}/socket", f"--key-file={key}", f"--log-file={m}/munged.log",
            f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed", "--origin=127.0.0.1", "--num-threads=2",
        ])  # fmt: skip
        self._wait(lambda: (m / "socket").exists(), 30, "munged's socket")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60, "an idle node")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        self.daemons.append(Daemon([*traced(self.root / f"{name}.strace"), *cmd], self.root / f"{name}.out"))

    def _wait(self, predicate: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            dead = [d.log.name for d in self.daemons if not d.alive()]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in self.root.glob("*.out"))
                raise RuntimeError(f"Slurm did not come up ({what}; exited: {dead}):\n{logs}")
            time.sleep(0.5)

    def run(
        self, *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def stop(self) -> None:
        """Cancel every job (slurmstepd runs jobs in sessions of their own), then the daemons."""
        self.run("scancel", "--full", "--user", "root")
        deadline = time.monotonic() + 60
        while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
            time.sleep(1)
        for daemon in reversed(self.daemons):
            daemon.stop(grace_s=10)
