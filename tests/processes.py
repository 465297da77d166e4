"""Daemons a test starts (Ray nodes, Slurm, munge): each leads its own session, and is stopped by killing
every process of that session, by id. Never `ray stop` or a kill by name: other people's processes share
this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

STRACE = shutil.which("strace")


def traced(log: Path) -> list[str]:
    """The prefix that records every connect() of a command and its descendants, if strace exists."""
    return [STRACE, "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(log)] if STRACE else []


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after the command: state ppid pgrp session


def session_pids(sid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _session_of(pid) == sid]


class Daemon:
    """A command in a new session, its output in ``log``."""

    def __init__(self, cmd: Sequence[str | Path], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of the session (the daemon and whatever it started)."""
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM to the session, then SIGKILL to whatever is left after ``grace_s``."""
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while session_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.kill(signal.SIGKILL)


def wait_http(url: str, timeout: float, daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"the daemon behind {url} exited; see {daemon.log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer in {timeout:.0f} s")
        time.sleep(0.5)


def find_secret(secret: str, *paths: Path) -> list[str]:
    """Files under ``paths`` whose bytes contain ``secret`` (binary files, e.g. sqlite, included)."""
    needle = secret.encode()
    hits = []
    for root in paths:
        files = (
            [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        )
        for path in files:
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    hits.append(str(path))
    return hits
