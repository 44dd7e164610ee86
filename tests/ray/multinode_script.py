"""Run by tests/ray/test_multinode.py in its own process (python -m tests.ray.multinode_script): a
3-node Ray cluster on this machine (ray.cluster_utils.Cluster), two small jobs with placement=spread,
results as JSON on stdout."""

import contextlib
import json
import os
import signal
import tempfile
from typing import Any

import ray
from ray.cluster_utils import Cluster

from codistill.engine import RayEngine, Reporter
from tests.helpers import small_job


def main() -> None:
    node_args: dict = {"num_cpus": 1, "object_store_memory": 96 << 20}
    # A lost node is declared dead after 2 missed health checks 0.5 s apart (Ray's default: 5 x 3 s): the
    # node-loss part of the test waits for that, not for anything of ours.
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "include_dashboard": False, "_system_config": fast_health},
    )
    for _ in range(2):
        cluster.add_node(**node_args)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    out: dict[str, Any] = {"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
    # checkpoint mode with the sync schedule: every peer must receive its teachers (free-running
    # pulls on a fast peer may legitimately see none in 20 steps)
    # logits by reference (ray.put, pulled from the publisher's node)
    modes = {  # (small shards by value through the board are tested on one node: the board is on the driver's)
        "logits_by_reference": ["exchange.mode=logits", "exchange.inline_max_bytes=0"],
        "checkpoint": ["exchange.mode=checkpoint", "exchange.period=5", "exchange.sync=true"],
    }
    for key, mode in modes.items():
        cfg = small_job(
            "engine=ray",
            "resources.num_cpus=1",
            "resources.placement=spread",
            *mode,
            models=("mlp", "cnn", "mlp"),
            steps=20,
        )
        engine = RayEngine(cfg)
        history = engine.run(tempfile.mkdtemp())
        final = history[-1]
        out[key] = {
            "node_ids": [info["node_id"] for info in engine.peer_info],
            "steps": [p.step for p in final.peers],
            "bytes_pulled": [p.exchange.bytes_pulled for p in final.peers],
            "teacher_updates": [p.exchange.teacher_updates for p in final.peers],
            "accuracy": final.metrics["mean_peer_accuracy"],
        }
    out["node_lost"] = lose_a_node(cluster)
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(out))


class RemoveNodeOfPeer(Reporter):
    """After round 0, removes (kills the raylet and every process of) the worker node hosting a peer."""

    def __init__(self, cluster: Cluster, engine: RayEngine):
        self.cluster, self.engine = cluster, engine
        self.removed: str | None = None

    def on_round(self, result) -> None:
        if result.round != 0 or self.removed is not None:
            return
        head = ray.get_runtime_context().get_node_id()  # the driver's node, where the board lives
        victim = next(info for info in self.engine.peer_info if info["node_id"] != head)
        node = next(n for n in self.cluster.worker_nodes if n.node_id == victim["node_id"])
        self.cluster.remove_node(node, allow_graceful=False)
        # A lost machine takes its processes with it. remove_node kills the raylet; a worker notices its
        # raylet is gone only after a while and, being called directly, could finish the run meanwhile.
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGKILL)
        self.removed = victim["node_id"]


def lose_a_node(cluster: Cluster) -> dict:
    """Two peers on a three-node cluster; the node of one is lost after a round; Ray restarts that peer
    on the free node (its placement-group bundle is rescheduled) and the run finishes."""
    cfg = small_job(
        "engine=ray",
        "resources.num_cpus=1",
        "resources.placement=spread",
        "exchange.timeout_s=240",
        "eval_every=10",
        steps=40,
    )
    engine = RayEngine(cfg)
    remover = RemoveNodeOfPeer(cluster, engine)
    engine.reporter = remover
    history = engine.run(tempfile.mkdtemp())
    final = history[-1]
    return {
        "removed": remover.removed,
        "start_nodes": [info["node_id"] for info in engine.peer_info],
        "end_nodes": [p.node_id for p in final.peers],
        "steps": [[p.step for p in h.peers] for h in history],
        "restarts": [p.restarts for p in final.peers],
        "events": [e for h in history for e in h.events],
    }


if __name__ == "__main__":
    main()
