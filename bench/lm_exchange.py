"""Bytes per step and step time of lockstep DML between two GPT peers: full logit shards against top-k
shards (k = 8, 32, 128) and sampled shards (k = 8, 32, 128 tokens drawn per position, Sparse Logit Sampling),
and against independent training (`alpha: 0`), for vocabularies of 256 (bytes), 8192 (BPE) and 50,000
(synthetic logits: the loss and shard path only); then the quality of each kind of shard: validation loss of
the LM quickstart (jobs/lm_quickstart.yaml on the LocalEngine) after a fixed number of steps, three seeds.
Bench, not a test.

    python bench/lm_exchange.py                 # writes bench/results/lm_exchange.json
    python bench/lm_exchange.py --steps 40 --device cuda
    python bench/lm_exchange.py --vocabs none --quality-steps 900 --seeds 0,1,2   # the quality part only

Real runs (V = 256, 8192) use the LocalEngine on the offline corpus: the step time includes both peers'
forward, publish (top-k selection and encoding), fetch, decode, loss and backward; Ray's object-store
transfer is not in it (bytes are, as published by one peer per step). The synthetic row times the
publisher's encoding and the student's loss + backward for (B * T) positions of 50,000 classes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from codistill import config as C
from codistill.engine import LocalEngine
from codistill.exchange.logits import decode_shard, sampled_shard
from codistill.exchange.wire import LogitShard, encode_tensor, id_dtype
from codistill.losses import distillation_loss
from codistill.losses.sampled import sample_logits
from codistill.losses.topk import topk_logits
from codistill.table import text_table

ROOT = Path(__file__).resolve().parent.parent
SHARDS = {
    "alpha=0": None,
    "full": ("full", 0),
    "top-8": ("topk", 8),
    "top-32": ("topk", 32),
    "top-128": ("topk", 128),
    "sampled-8": ("sampled", 8),
    "sampled-32": ("sampled", 32),
    "sampled-128": ("sampled", 128),
}
QUALITY = ("alpha=0", "full", "top-32", "sampled-32")


def real_run(vocab: str, shard: tuple[str, int] | None, steps: int, device: str, batch: int, block: int) -> dict:
    data = {"name": "text", "block_size": block, "batch_size": batch, "max_chars": 1_000_000, "limit_test": 8}
    data |= {"tokenizer": "byte"} if vocab == "256" else {"tokenizer": "bpe", "vocab_size": int(vocab)}
    raw = {
        "name": "bench",
        "steps": steps,
        "eval_every": steps,
        "engine": "local",
        "device": device,
        "data": data,
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0, "schedule": "constant"},
        "peers": [{"model": "gpt-tiny", "model_args": {"n_embd": 96, "n_head": 4}}, {"model": "gpt-small"}],
        "loss": {"alpha": 0.0 if shard is None else 0.3, "temperature": 1.0},
        "exchange": {"dtype": "bfloat16"} | ({} if shard is None else {"logits": shard[0], "topk": max(1, shard[1])}),
        "tracking": "none",
    }
    engine = LocalEngine(C.build(raw))
    t0 = time.perf_counter()
    history = engine.run()
    wall = time.perf_counter() - t0
    peers = history[-1].peers
    busy = max(p.busy_s for p in peers)
    return {
        "bytes_per_step": peers[0].exchange.bytes_published / steps,
        "step_ms": 1000 * busy / steps,
        "wall_s": wall,
        "final_train_loss": [p.train_loss for p in peers],
    }


def synthetic(vocab: int, shard: tuple[str, int] | None, positions: int, device: str, repeats: int = 5) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    teacher = torch.randn(positions, vocab, generator=g).to(device)
    student = torch.randn(positions, vocab, generator=g).to(device).requires_grad_()
    times, nbytes = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        if shard is None:
            loss = torch.nn.functional.cross_entropy(student, torch.zeros(positions, dtype=torch.long, device=device))
        else:
            if shard[0] == "full":
                wire = LogitShard(0, 0, torch.zeros(1).long().numpy(), encode_tensor(teacher, "bfloat16"), "bfloat16")
            elif shard[0] == "sampled":
                drawn = sample_logits(teacher, shard[1], 1.0, torch.Generator(device=device).manual_seed(0))
                wire = sampled_shard(0, 0, torch.zeros(1).long().numpy(), drawn, "bfloat16")
            else:
                top = topk_logits(teacher, shard[1], 1.0)
                wire = LogitShard(
                    0,
                    0,
                    torch.zeros(1).long().numpy(),
                    encode_tensor(top.values, "bfloat16"),
                    "bfloat16",
                    top.ids.cpu().numpy().astype(id_dtype(vocab)),
                    top.lse.cpu().numpy(),
                    top.lse_rest.cpu().numpy(),
                    vocab,
                )
            nbytes = wire.nbytes
            loss = distillation_loss(student, [decode_shard(wire, device)], divergence="kl", temperature=1.0)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"bytes_per_step": nbytes, "step_ms": 1000 * sorted(times)[len(times) // 2], "synthetic": True}


def quality_run(shard: tuple[str, int] | None, steps: int, seed: int, device: str) -> dict:
    """The LM quickstart with these shards for `steps` steps (its cosine schedule over them), evaluated at the end."""
    sets = [
        "engine=local",
        f"device={device}",
        "tracking.backend=none",
        f"steps={steps}",
        f"eval_every={steps}",
        f"seed={seed}",
    ]
    if shard is None:
        sets.append("loss.alpha=0")
    else:
        sets += [f"exchange.logits={shard[0]}", f"exchange.topk={max(1, shard[1])}"]
    engine = LocalEngine(C.load_job(str(ROOT / "jobs" / "lm_quickstart.yaml"), sets))
    t0 = time.perf_counter()
    history = engine.run()
    peers = history[-1].peers
    return {
        "val_loss": [p.eval.loss for p in peers],
        "mean_val_loss": sum(p.eval.loss for p in peers) / len(peers),
        "bytes_per_step": peers[0].exchange.bytes_published / steps,
        "step_ms": 1000 * max(p.busy_s for p in peers) / steps,
        "wall_s": time.perf_counter() - t0,
    }


def quality(steps: int, seeds: list[int], device: str) -> tuple[list[dict], str]:
    """Validation loss after `steps` steps of the LM quickstart for each kind of shard and seed, and its table."""
    import statistics

    results, rows = [], []
    for label in QUALITY:
        runs = []
        for seed in seeds:
            r = quality_run(SHARDS[label], steps, seed, device) | {"shards": label, "seed": seed}
            print(f"  quickstart {label} seed {seed}: mean val loss {r['mean_val_loss']:.4f}", flush=True)
            runs.append(r)
        results += runs
        losses = [r["mean_val_loss"] for r in runs]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        rows.append(
            (
                label,
                f"{statistics.mean(losses):.4f} ± {spread:.4f}",
                " ".join(f"{x:.4f}" for x in losses),
                f"{statistics.mean(r['bytes_per_step'] for r in runs):,.0f}",
                f"{statistics.mean(r['step_ms'] for r in runs):.1f}",
            )
        )
    header = ("shards", "mean peer val loss (sd)", "per seed", "bytes/step", "ms/step")
    return results, text_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocabs", default="256,8192,50000", help="'none': skip the bytes and time part")
    ap.add_argument("--quality-steps", type=int, default=900, help="the quickstart's own 900; 0: skip the quality part")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_exchange.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, results = [], []
    for vocab in [v for v in args.vocabs.split(",") if v != "none"]:
        for label, shard in SHARDS.items():
            if vocab == "50000":
                r = synthetic(50_000, shard, args.batch * args.block, args.device)
            else:
                r = real_run(vocab, shard, args.steps, args.device, args.batch, args.block)
            r |= {"vocab": int(vocab), "shards": label}
            results.append(r)
            full = next((x["bytes_per_step"] for x in results if x["vocab"] == int(vocab) and x["shards"] == "full"), 0)
            share = f"{r['bytes_per_step'] / full:.3f}" if full else ""
            rows.append(
                (
                    vocab + (" (synthetic)" if r.get("synthetic") else ""),
                    label,
                    f"{r['bytes_per_step']:,.0f}",
                    share,
                    f"{r['step_ms']:.1f}",
                )
            )
            print(f"  V={vocab} {label}: {r['bytes_per_step']:,.0f} B/step, {r['step_ms']:.1f} ms/step", flush=True)
    if rows:
        print(text_table(("vocab", "shards", "bytes/step", "of full", "ms/step"), rows))
    quality_results: list[dict] = []
    if args.quality_steps > 0:
        seeds = [int(s) for s in args.seeds.split(",")]
        quality_results, table = quality(args.quality_steps, seeds, args.device)
        print(f"LM quickstart, {args.quality_steps} steps, seeds {args.seeds}:")
        print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "batch": args.batch, "block": args.block, "steps": args.steps}
    meta |= {"quality_steps": args.quality_steps, "seeds": args.seeds}
    out = {"config": meta, "results": results, "quality": quality_results}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
