"""Data-parallel peers on CPU: samples/s per peer and for the job with one and two workers per peer, the cost
of the exchange per step against `alpha: 0`, and the start-up cost of a Ray Train-backed peer.

Real RayEngine runs on scikit-learn's digits (offline): two CNN peers in lockstep DML, every worker with
`--cpus` CPUs and one thread. Start-up is the time from the engine's start to every peer built and ready
(the Train controller, its worker group, the process group and the peer inside each rank).

    python bench/dp_peers.py                     # writes bench/results/dp_peers.json
    python bench/dp_peers.py --steps 400 --cpus 0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from codistill import config as C
from codistill.engine import RayEngine
from codistill.engine.report import Reporter
from codistill.table import text_table

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"W=1, DML": (1, 0.5), "W=1, alpha=0": (1, 0.0), "W=2, DML": (2, 0.5), "W=2, alpha=0": (2, 0.0)}


class _StartClock(Reporter):
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.started_s = 0.0

    def on_start(self, cfg: C.RunConfig, total_steps: int) -> None:
        self.started_s = time.perf_counter() - self.t0


def run(workers: int, alpha: float, args: argparse.Namespace) -> dict:
    raw = {
        "name": "bench_dp",
        "seed": 0,
        "steps": args.steps,
        "eval_every": args.steps,
        "engine": "ray",
        "data": {"name": "digits", "batch_size": args.batch, "augment": False},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
        "peers": [{"model": "cnn", "workers": workers}, {"model": "cnn", "workers": workers, "seed": 7}],
        "loss": {"alpha": alpha, "temperature": 2.0},
        "resources": {"num_cpus": args.cpus, "threads_per_peer": 1},
        "tracking": "none",
    }
    clock = _StartClock()
    with tempfile.TemporaryDirectory() as out:
        history = RayEngine(C.build(raw), reporter=clock).run(out)
    wall = time.perf_counter() - clock.t0
    peers = history[-1].peers
    return {
        "workers": workers,
        "alpha": alpha,
        "samples_per_s": [p.samples_per_s for p in peers],
        "job_samples_per_s": sum(p.samples_per_s for p in peers),
        "step_ms": [1000 * p.busy_s / p.step for p in peers],
        "exchange_ms_per_step": [1000 * p.exchange.exchange_s / p.step for p in peers],
        "startup_s": clock.started_s,
        "wall_s": wall,
        "test_accuracy": [p.eval.accuracy for p in peers],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cpus", type=float, default=0.5, help="CPUs per worker")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dp_peers.json"))
    args = ap.parse_args()
    ray.init(address="local", include_dashboard=False)
    results, rows = [], []
    try:
        for label, (workers, alpha) in SETTINGS.items():
            r = run(workers, alpha, args) | {"setting": label}
            results.append(r)
            rows.append(
                (
                    label,
                    ", ".join(f"{s:,.0f}" for s in r["samples_per_s"]),
                    f"{r['job_samples_per_s']:,.0f}",
                    f"{max(r['step_ms']):.1f}",
                    f"{max(r['exchange_ms_per_step']):.2f}",
                    "",
                    f"{r['startup_s']:.1f}",
                )
            )
            print(f"  {label}: {r['job_samples_per_s']:,.0f} samples/s, start-up {r['startup_s']:.1f}s", flush=True)
    finally:
        ray.shutdown()
    # the DML rows run first: their exchange cost is filled in against the alpha=0 row of the same W
    for i, r in enumerate(results):
        base = next(x for x in results if x["workers"] == r["workers"] and x["alpha"] == 0)
        if r["alpha"] > 0:
            rows[i] = (*rows[i][:5], f"{max(r['step_ms']) - max(base['step_ms']):+.1f}", rows[i][6])
    head = ("setting", "samples/s per peer", "job samples/s", "ms/step", "exchange ms/step", "vs alpha=0", "start s")
    print(text_table(head, rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
