"""Hold one CPU of a Ray cluster's head until killed: ``python tests/ray_hold.py ADDRESS READY_FILE``.

The two-node test needs its 2 workers on both nodes. SPREAD is best effort, and on a loaded machine
Ray has put both on the head even after the head's scheduler listed the second node; with one of the
head's 2 CPUs held here, a worker can only go to the second node. Killing this process (a Ray driver)
ends its actor and gives the CPU back for the run's restart on the head.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ray


@ray.remote(num_cpus=1, resources={"node:__internal_head__": 0.001})  # Ray's own marker of the head
class _Holder:
    def ready(self) -> bool:
        return True


def main(address: str, ready_file: str) -> None:
    ray.init(address=address, log_to_driver=False)
    holder = _Holder.remote()  # type: ignore[attr-defined]
    ray.get(holder.ready.remote())
    Path(ready_file).write_text("held\n")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
