"""Tokens per second of GPT peers sharing one GPU against one peer alone on it (issue 11, item 7).

Each configuration is a real RayEngine run on the offline corpus (byte tokens): every peer is its own Ray
actor holding `resources.num_gpus` of the GPU (1 alone, 1/2 each when two share it), with bf16 autocast
and fused attention. Rows: one peer alone; two peers training independently (`alpha: 0`); two peers in
lockstep DML (logit shards through the object store every step). Tokens/s is a peer's training tokens
over its busy time (steps, no evaluation); the total is the sum over the peers running at once.

    python bench/gpu_sharing.py                        # on a GPU machine; writes bench/results/gpu_sharing.json
    python bench/gpu_sharing.py --device cpu --steps 20 --model gpt-tiny   # the same path on a CPU, as a check
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

from codistill import config as C
from codistill.engine import RayEngine
from codistill.table import text_table

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"one alone": (1, 0.0), "two, alpha=0": (2, 0.0), "two, DML": (2, 0.3)}


def run(num_peers: int, alpha: float, args: argparse.Namespace) -> dict:
    on_gpu = args.device == "cuda"
    raw = {
        "name": "bench_gpu_sharing",
        "steps": args.steps,
        "eval_every": args.steps,
        "engine": "ray",
        "device": args.device,
        "amp": True,
        "data": {
            "name": "text",
            "tokenizer": "byte",
            "block_size": args.block,
            "batch_size": args.batch,
            "max_chars": 2_000_000,
            "limit_test": 16,
        },
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0, "schedule": "constant"},
        "peers": [{"model": args.model}] * num_peers,
        "loss": {"alpha": alpha, "temperature": 1.0},
        "exchange": {"dtype": "bfloat16"},
        "resources": {"num_cpus": 1, "num_gpus": (1.0 / num_peers) if on_gpu else 0.0},
        "tracking": "none",
    }
    cfg = C.build(raw)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        history = RayEngine(cfg).run(out)
    wall = time.perf_counter() - t0
    peers = history[-1].peers
    tokens = args.steps * args.batch * args.block
    per_peer = [tokens / p.busy_s for p in peers]
    return {
        "num_peers": num_peers,
        "alpha": alpha,
        "tokens_per_s_per_peer": per_peer,
        "tokens_per_s_total": sum(per_peer),
        "busy_s": [p.busy_s for p in peers],
        "val_loss": [p.eval.loss for p in peers],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="gpt-small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_sharing.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run with --device cpu to check the path on a CPU")
    ray.init(address="local", num_cpus=4, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False)
    results, rows = [], []
    try:
        for label, (num_peers, alpha) in SETTINGS.items():
            r = run(num_peers, alpha, args) | {"setting": label}
            results.append(r)
            alone = results[0]["tokens_per_s_total"]
            rows.append(
                (
                    label,
                    ", ".join(f"{t:,.0f}" for t in r["tokens_per_s_per_peer"]),
                    f"{r['tokens_per_s_total']:,.0f}",
                    f"{r['tokens_per_s_total'] / alone:.2f}",
                    f"{r['wall_s']:.1f}",
                )
            )
            print(f"  {label}: {r['tokens_per_s_total']:,.0f} tokens/s in all", flush=True)
    finally:
        ray.shutdown()
    print(text_table(("setting", "tokens/s per peer", "tokens/s total", "x one alone", "wall s"), rows))
    meta = vars(args) | {
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
