"""Exchange benchmarks (not a test): overhead of each exchange, and object-store transfer speed.

    python bench/exchange.py                       # both parts, CPU defaults; writes bench/results/exchange.json
    python bench/exchange.py --part overhead --model resnet20 --steps 60
    python bench/exchange.py --part transfer --sizes-mb 10 100 500

overhead: two equal peers (RayEngine, one actor each) on a CIFAR-shaped synthetic dataset; training
steps/s with `alpha: 0` (no exchange) against each exchange, as ratios, and the share of each peer's
busy time spent in exchange (publish + pull + wait). For `checkpoint` the teachers' forward passes are
compute the method asks for, so the overhead beyond them is reported separately.

transfer: a state dict of N MB published by one actor and pulled by another through the real
RayBoardActor path (encode to numpy, board pulls `take_weights`, consumer `ray.get`s and decodes to
torch), against an in-process copy (`clone`) of the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def overhead(args) -> list[dict]:
    from codistill import config as C
    from codistill.engine import RayEngine, build_summary

    variants = [
        ("independent (alpha=0)", ["loss.alpha=0"]),
        ("logits staleness 0", ["exchange.mode=logits", "exchange.staleness=0"]),
        ("logits staleness 4", ["exchange.mode=logits", "exchange.staleness=4"]),
        ("checkpoint period 1", ["exchange.mode=checkpoint", "exchange.period=1"]),
        ("checkpoint period 10", ["exchange.mode=checkpoint", "exchange.period=10"]),
        ("checkpoint period 100", ["exchange.mode=checkpoint", "exchange.period=100"]),
    ]
    base_raw = {
        "name": "bench-exchange",
        "seed": 0,
        "steps": args.steps,
        "eval_every": args.steps,
        "engine": "ray",
        "device": args.device,
        "data": {
            "name": "synthetic",
            "batch_size": args.batch_size,
            "synthetic_train": 2048,
            "synthetic_shape": [3, 32, 32],
            "eval_batch_size": 512,
        },
        "optim": {"lr": 0.05, "schedule": "constant"},
        "peers": [{"model": args.model}, {"model": args.model}],
        "loss": {"alpha": 0.5, "temperature": 3.0},
        "resources": {"num_cpus": 1, "num_gpus": args.gpus_per_peer},
        "tracking": "none",
    }
    rows = []
    for label, sets in variants:
        cfg = C.build(C.apply_overrides(base_raw, sets))
        t0 = time.perf_counter()
        engine = RayEngine(cfg)
        history = engine.run(tempfile.mkdtemp(prefix="bench-"))
        s = build_summary(cfg, history, time.perf_counter() - t0)
        peers = s["peers"]
        busy = sum(p["busy_s"] for p in peers)
        row = {
            "variant": label,
            "steps_per_s": sum(p["steps_per_s"] for p in peers) / len(peers),
            "exchange_share": sum(p["exchange_s"] for p in peers) / busy,
            "teacher_forward_share": sum(p["teacher_forward_s"] for p in peers) / busy,
            "bytes_exchanged": s["bytes_exchanged"],
            "staleness_mean": s["staleness"]["mean"],
        }
        rows.append(row)
        print(
            f"  {label:<24} {row['steps_per_s']:7.2f} steps/s per peer  exchange {100 * row['exchange_share']:5.1f}%",
            flush=True,
        )
    base = rows[0]["steps_per_s"]
    for row in rows:
        row["ratio_vs_independent"] = row["steps_per_s"] / base
        # time per step beyond the independent run, minus the teachers' forward passes, relative to it
        extra = (1 / row["steps_per_s"] - 1 / base) - row["teacher_forward_share"] / row["steps_per_s"]
        row["overhead_beyond_teacher_forward"] = extra * base
    return rows


def transfer(args) -> list[dict]:
    import ray
    import torch

    from codistill.exchange import decode_weights, encode_weights
    from codistill.exchange.ray_board import RayBoardActor, RayBoardClient

    @ray.remote(num_cpus=0, concurrency_groups={"exchange": 1})  # type: ignore[call-overload]
    class Publisher:
        def __init__(self, board_name):
            self.client = RayBoardClient(ray.get_actor(board_name), 0)

        def make_state(self, mb: int) -> None:
            n = mb * (1 << 20) // 4 // 8
            self.state = {f"layer{i}.weight": torch.randn(n) for i in range(8)}

        def publish(self, version: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            weights = encode_weights(self.state, version, "float32")  # the snapshot copy, on the training thread
            t1 = time.perf_counter()
            self.client.publish_weights(0, weights)
            return t1 - t0, time.perf_counter() - t0

        def take_weights(self, version: int):
            return self.client.take_weights(version)

    @ray.remote(num_cpus=0)
    class Consumer:
        def __init__(self, board_name):
            self.client = RayBoardClient(ray.get_actor(board_name), 1)

        def pull(self, version: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            w = self.client.pull_weights(1, {0: -1}, {0: version}, True, 120.0)[0]
            tensors = decode_weights(w)
            return time.perf_counter() - t0, sum(t.numel() * 4 for t in tensors.values())

    rows = []
    for mb in args.sizes_mb:
        run = f"bench-{mb}-{os.getpid()}"
        # sync: false -> the board keeps only the newest version (older ones would fill the store and spill)
        cfg = {"steps": 1, "peers": ["mlp", "mlp"], "exchange": {"mode": "checkpoint", "sync": False}}
        board: Any = (
            ray.remote(RayBoardActor)
            .options(name=f"{run}-board", num_cpus=0, max_concurrency=1000)
            .remote(cfg, [f"{run}-pub", f"{run}-con"], ray.get_runtime_context().namespace)
        )
        pub = Publisher.options(name=f"{run}-pub").remote(f"{run}-board")  # type: ignore[attr-defined]
        con = Consumer.options(name=f"{run}-con").remote(f"{run}-board")  # type: ignore[attr-defined]
        ray.get(pub.make_state.remote(mb))
        ray.get(pub.publish.remote(0))  # warm-up: first-touch page faults in the store and the actors
        ray.get(con.pull.remote(0))
        totals, publishes = [], []
        for version in range(1, args.repeats + 1):
            t0 = time.perf_counter()  # publish (encode + announce; the board pulls) until the consumer has tensors
            encode_s, publish_s = ray.get(pub.publish.remote(version))
            pull_s, nbytes = ray.get(con.pull.remote(version))
            totals.append(time.perf_counter() - t0)
            publishes.append(publish_s)
            if os.environ.get("BENCH_VERBOSE"):
                print(
                    f"    {mb} MB: encode {encode_s:.3f}s publish {publish_s:.3f}s pull {pull_s:.3f}s "
                    f"total {totals[-1]:.3f}s"
                )
        state = {f"w{i}": torch.randn(mb * (1 << 20) // 4 // 8) for i in range(8)}
        copies = [_timed(lambda s=state: {k: v.clone() for k, v in s.items()}) for _ in range(args.repeats + 1)][1:]
        best, copy_s = min(totals), min(copies)
        median, copy_median = statistics.median(totals), statistics.median(copies)
        row = {
            "size_mb": mb,
            "repeats": args.repeats,
            "publish_and_pull_s": best,
            "publish_and_pull_median_s": median,
            "publish_on_training_thread_median_s": statistics.median(publishes),
            "object_store_gb_s": nbytes / best / 1e9,
            "object_store_median_gb_s": nbytes / median / 1e9,
            "in_process_copy_s": copy_s,
            "in_process_copy_gb_s": nbytes / copy_s / 1e9,
            "in_process_copy_median_gb_s": nbytes / copy_median / 1e9,
            "ratio": copy_s / best,
            "ratio_median": copy_median / median,
        }
        rows.append(row)
        print(
            f"  {mb:5d} MB  object store {row['object_store_gb_s']:6.2f} GB/s "
            f"(median {row['object_store_median_gb_s']:.2f})"
            f"   in-process copy {row['in_process_copy_gb_s']:6.2f} GB/s "
            f"(median {row['in_process_copy_median_gb_s']:.2f})"
            f"   ratio {row['ratio']:.2f} (median {row['ratio_median']:.2f})",
            flush=True,
        )
        for a in (pub, con, board):
            ray.kill(a)
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["overhead", "transfer", "all"], default="all")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpus-per-peer", type=float, default=0.0)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "exchange.json"))
    args = ap.parse_args()

    import ray

    ray.init(
        include_dashboard=False, object_store_memory=max(args.sizes_mb) * 3 << 20 if args.part != "overhead" else None
    )
    result: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "args": vars(args)}
    if args.part in ("overhead", "all"):
        print(f"overhead: two {args.model} peers, batch {args.batch_size}, {args.steps} steps, one Ray actor each")
        result["overhead"] = overhead(args)
    if args.part in ("transfer", "all"):
        print("transfer: state dict published by one actor, pulled by another (same node)")
        result["transfer"] = transfer(args)
    ray.shutdown()

    if "overhead" in result:
        print(
            "\n| variant | steps/s per peer | vs independent | exchange share | teacher fwd share "
            "| overhead beyond teacher fwd |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for r in result["overhead"]:
            print(
                f"| {r['variant']} | {r['steps_per_s']:.2f} | {r['ratio_vs_independent']:.3f} | "
                f"{100 * r['exchange_share']:.1f}% | {100 * r['teacher_forward_share']:.1f}% | "
                f"{100 * r['overhead_beyond_teacher_forward']:+.1f}% |"
            )
    if "transfer" in result:
        print(
            "\n| size | object store GB/s best (median) | in-process copy GB/s best (median) | ratio best (median) |"
            " publish on training thread |"
        )
        print("| --- | --- | --- | --- | --- |")
        for r in result["transfer"]:
            print(
                f"| {r['size_mb']} MB | {r['object_store_gb_s']:.2f} ({r['object_store_median_gb_s']:.2f}) | "
                f"{r['in_process_copy_gb_s']:.2f} ({r['in_process_copy_median_gb_s']:.2f}) | "
                f"{r['ratio']:.2f} ({r['ratio_median']:.2f}) | "
                f"{1000 * r['publish_on_training_thread_median_s']:.0f} ms |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
