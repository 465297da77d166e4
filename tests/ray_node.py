"""A Ray worker node on loopback, joined to a running head: ``python tests/ray_node.py ADDRESS FILE [CPUS]``.

What ``ray start --address ADDRESS --node-ip-address 127.0.0.1 --block`` would do, had Ray's CLI not
refused a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and without that variable Ray swaps
127.0.0.1 for the host's routable address (after asking which one by a UDP connect to 8.8.8.8). This
starts the node as ray.cluster_utils.Cluster.add_node does, writes its node id to FILE and blocks; its
processes stay in this process's group, so killing the group is the node's sudden death.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "set it: this node must stay on loopback"

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402


def main(address: str, id_file: str, cpus: int = 1) -> None:
    params = ray._private.parameter.RayParams(
        gcs_address=address,
        node_ip_address="127.0.0.1",
        num_cpus=cpus,
        num_gpus=0,
        object_store_memory=150 * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        include_log_monitor=False,  # one log monitor per machine: the head's
        dashboard_agent_listen_port=None,  # a free port, not the head agent's
        resources={"second_node": 1.0},
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    Path(id_file).write_text(node.node_id)
    signal.signal(signal.SIGTERM, lambda *_: (node.kill_all_processes(check_alive=False), sys.exit(0)))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
