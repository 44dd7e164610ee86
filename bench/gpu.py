"""Every GPU figure of codistill from one command: on a machine with one GPU, in under 8 minutes, one process.

  (a) loop: samples/s of the plain one-process PyTorch DML loop (bench/throughput.py's, bf16 autocast) against
      codistill: LocalEngine, RayEngine in logits mode, in checkpoint mode (period 10) and with alpha 0 (no
      exchange), for resnet20 (CIFAR-shaped synthetic images) and gpt-small (byte tokens of the offline corpus),
      two batch sizes each, `amp: true` (bf16);
  (b) sharing: 1, 2 and 4 ResNet-20 peers sharing the GPU (fractional `num_gpus`, DML; one peer alone trains
      plainly) against the plain loop training two of them;
  (c) cifar: a CIFAR-10 ResNet-20 pair, DML then checkpoint exchange, each trained for the steps that fit its
      half of `--cifar-budget-s` at the speed (a) measured, with each peer's accuracy, the ensemble's and churn;
  (d) breakdown: one GPT peer's step split into phases, the device synchronised around each: forward, the
      device-to-host copy of its logits (inside publish), publish, pull (the teacher's shard fetched, copied to
      the device and decoded), loss + backward + optimiser step; in one process with the in-memory board, so the
      figures are the peer's own work (Ray's share is (a)'s exchange ms/step);
  (e) scaling: bench/batch_scaling.py at GPU sizes (a 4x256 GPT, blocks of 128, B = 64): one model at B/2 .. 4B
      against two co-distilling at B, steps to target losses (Anil et al.'s batch-size claim); its own JSON and
      plot beside this one (batch_scaling_<device>.json).

    python bench/gpu.py                                     # one GPU; writes bench/results/gpu.json
    python bench/gpu.py --cifar ../shared/datasets/cifar10 # (c) on CIFAR-10 (Hugging Face Parquet)
    python bench/gpu.py --device cpu --quick                # the same path on a CPU in about two minutes (CI)

Without `--cifar` (or where its folder is missing) part (c) trains on synthetic CIFAR-shaped images and says so.
On the device machine (no network, Ray from wheels): see DEVELOPERS.md, "The GPU machine".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/throughput.py beside this file

from throughput import CORES, base_job, codistill_local, codistill_ray, plain_loop

ROOT = Path(__file__).resolve().parent.parent
LOOP_VARIANTS = [
    ("LocalEngine", None),
    ("Ray logits", ["exchange.mode=logits"]),
    ("Ray checkpoint p10", ["exchange.mode=checkpoint", "exchange.period=10"]),
    ("Ray alpha=0", ["loss.alpha=0"]),
]


def lm_job(model: str, batch_size: int, steps: int, device: str, block_size: int, num_peers: int = 2) -> dict:
    """Two GPT peers on the offline corpus (byte tokens), AdamW: what bench/gpu.py measures language models on."""
    return {
        "name": "bench-gpu-lm",
        "seed": 0,
        "steps": steps,
        "eval_every": steps,
        "engine": "ray",
        "device": device,
        "amp": True,
        "data": {
            "name": "text",
            "tokenizer": "byte",
            "block_size": block_size,
            "batch_size": batch_size,
            "eval_batch_size": 64,
            "max_chars": 2_000_000,
            "limit_test": 64,
        },
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0, "schedule": "constant"},
        "peers": [{"model": model}] * num_peers,
        "loss": {"alpha": 0.3, "temperature": 1.0, "divergence": "kl"},
        "exchange": {"mode": "logits", "staleness": 0, "dtype": "bfloat16"},
        "tracking": "none",
    }


def image_job(batch_size: int, steps: int, device: str, num_peers: int = 2) -> dict:
    return {**base_job("resnet20", batch_size, steps, num_peers=num_peers, device=device), "amp": True}


def _print_row(r: dict) -> None:
    print(
        f"  {r['model']:<9} b={r['batch_size']:<4} {r['variant']:<22} {r['samples_per_s']:10.1f} samples/s  "
        f"ratio {r.get('ratio_vs_plain', 1.0):.2f}  (train {r['train_s']:.1f}s, wall {r['wall_s']:.1f}s)",
        flush=True,
    )


def part_loop(args) -> list[dict]:
    rows = []
    for model in ("resnet20", "gpt-small"):
        image = model == "resnet20"
        for b in args.image_batches if image else args.lm_batches:
            if image:
                raw = image_job(b, args.image_steps, args.device)
            else:
                raw = lm_job(model, b, args.lm_steps, args.device, args.block_size)
            group = [plain_loop(raw)]
            for label, sets in args.loop_variants[model]:
                group.append(codistill_local(raw) if sets is None else codistill_ray(raw, label, sets))
            for r in group:
                r["ratio_vs_plain"] = r["samples_per_s"] / group[0]["samples_per_s"]
                r["model"] = model
                _print_row(r)
            rows += group
    return rows


def part_sharing(args) -> list[dict]:
    rows = [plain_loop(image_job(args.image_batches[0], args.image_steps, args.device), "plain loop, 2 models")]
    for n in args.peers_on_gpu:
        raw = image_job(args.image_batches[0], args.image_steps, args.device, num_peers=n)
        rows.append(codistill_ray(raw, f"{n} peer(s) on one device", ["loss.alpha=0"] if n == 1 else []))
    for r in rows:
        r["ratio_vs_plain"] = r["samples_per_s"] / rows[0]["samples_per_s"]
        r["samples_per_s_per_peer"] = r["samples_per_s"] / r["num_peers"]
        _print_row(r)
    return rows


def part_cifar(args, loop_rows: list[dict]) -> dict[str, Any]:
    """The pair for the steps its share of the budget holds at the speed (a) measured for resnet20 at this batch."""
    from codistill import config as C
    from codistill.engine import RayEngine, build_summary

    b = args.image_batches[0]
    cifar = Path(args.cifar) if args.cifar else None
    real = cifar is not None and (cifar / "train.parquet").exists() and (cifar / "test.parquet").exists()
    out: dict[str, Any] = {"data": str(cifar) if real else "synthetic 3x32x32 (no --cifar folder)", "arms": []}
    for label, variant, sets in (
        ("DML", "Ray logits", ["exchange.mode=logits"]),
        ("checkpoint", "Ray checkpoint p10", ["exchange.mode=checkpoint", "exchange.period=50"]),
    ):
        measured = [r for r in loop_rows if (r["model"], r["batch_size"], r["variant"]) == ("resnet20", b, variant)]
        steps_per_s = measured[0]["samples_per_s"] / 2 / b if measured else 10.0  # per peer
        steps = max(8 if args.quick else 20, int(args.cifar_budget_s / 2 * steps_per_s))
        raw = image_job(b, steps, args.device)
        if real:
            assert cifar is not None
            raw["data"] = {
                "name": "parquet",
                "train": str(cifar / "train.parquet"),
                "test": str(cifar / "test.parquet"),
                "batch_size": b,
                "eval_batch_size": 1000,
                "augment": True,
            }
        raw["eval_every"] = steps if args.quick else max(1, steps // 4)  # rounds: the accuracy curve
        raw["steps"] = steps - steps % raw["eval_every"]
        n = 2
        resources = [f"resources.num_cpus={CORES / n}", f"resources.threads_per_peer={max(1, CORES // n)}"]
        if args.device == "cuda":
            resources.append(f"resources.num_gpus={1 / n}")
        cfg = C.build(C.apply_overrides(raw, [*resources, *sets, "loss.temperature=1", "optim.schedule=cosine"]))
        t0 = time.perf_counter()
        history = RayEngine(cfg).run(tempfile.mkdtemp(prefix="bench-gpu-cifar-"))
        s = build_summary(cfg, history, time.perf_counter() - t0)
        n_train = s["rounds"][-1]["step"] * b  # examples one peer saw
        arm = {
            "arm": label,
            "steps": cfg.steps,
            "batch_size": b,
            "examples_per_peer": n_train,
            "peer_accuracy": [p["test_accuracy"] for p in s["peers"]],
            "ensemble_accuracy": s["ensemble"]["test_accuracy"],
            "churn": s["churn"],
            "wall_s": time.perf_counter() - t0,
            "busy_s": [p["busy_s"] for p in s["peers"]],
            "rounds": [{"step": r["step"], "mean_peer_accuracy": r.get("mean_peer_accuracy")} for r in s["rounds"]],
        }
        out["arms"].append(arm)
        print(
            f"  {label:<10} {cfg.steps} steps of {b} ({n_train:,} examples per peer): accuracy "
            f"{', '.join(f'{a:.4f}' for a in arm['peer_accuracy'])}  ensemble {arm['ensemble_accuracy']:.4f}  "
            f"churn {arm['churn']:.4f}  ({arm['wall_s']:.0f}s)",
            flush=True,
        )
    return out


def part_breakdown(args) -> dict[str, Any]:
    """One GPT peer's step, phase by phase (see module docstring); the median over the measured steps, in ms."""
    import torch

    from codistill import config as C
    from codistill.data import load_dataset
    from codistill.engine.peer_start import peer_start
    from codistill.exchange import make_exchange
    from codistill.exchange.logits import LogitExchange
    from codistill.exchange.modes import in_memory_board
    from codistill.exchange.wire import encode_tensor
    from codistill.peer import Peer

    raw = lm_job(args.breakdown_model, args.lm_batches[0], args.breakdown_steps, args.device, args.block_size)
    cfg = C.build({**raw, "engine": "local"})
    torch.set_num_threads(CORES)
    ds = load_dataset(cfg.data)
    peers = [Peer(peer_start(cfg, i), ds) for i in range(2)]
    board = in_memory_board(cfg)
    exchanges = [make_exchange(cfg, i, board) for i in range(2)]
    assert isinstance(exchanges[0], LogitExchange)
    device = peers[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases: dict[str, list[float]] = {k: [] for k in ("forward", "d2h copy", "publish", "pull", "loss+backward+step")}

    def timed(name: str, keep: bool, fn, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        if keep:
            phases[name].append(1000 * (time.perf_counter() - t0))
        return out

    warmup = min(5, args.breakdown_steps // 2)
    peer, other, other_ex = peers[0], peers[1], exchanges[1]
    ex: LogitExchange = exchanges[0]
    for step in range(args.breakdown_steps):
        keep = step >= warmup
        ids, logits = timed("forward", keep, peer.forward, step)
        timed("d2h copy", keep, encode_tensor, logits, cfg.exchange.dtype)  # what publish copies
        timed("publish", keep, ex._publish, step, step, ids, logits, {})
        other_ex.start_step(other, step)
        teachers = timed("pull", keep, ex.teacher_signals, peer, step)
        timed("loss+backward+step", keep, peer.train_step, teachers)
        other.train_step(other_ex.teacher_signals(other, step))
        for i, (p, e) in enumerate(zip(peers, exchanges)):
            e.end_step(p, step)
            board.mark_durable(i, p.step)
    medians = {k: statistics.median(v) for k, v in phases.items()}
    step_ms = sum(v for k, v in medians.items() if k != "d2h copy")  # the copy is inside publish
    out = {
        "model": args.breakdown_model,
        "batch_size": cfg.data.batch_size,
        "block_size": args.block_size,
        "logits_bytes_per_step": int(logits.numel()) * (2 if cfg.exchange.dtype == "bfloat16" else 4),
        "device": str(device),
        "steps_measured": len(phases["forward"]),
        "median_ms": medians,
        "step_ms": step_ms,
        "share": {k: v / step_ms for k, v in medians.items()},
    }
    for k, v in medians.items():
        print(f"  {k:<20} {v:8.3f} ms  {100 * v / step_ms:5.1f}% of the step", flush=True)
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpus": CORES,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def part_scaling(args) -> dict[str, Any]:
    """(e): bench/batch_scaling.py at this device's sizes; the figures that answer the claim, per target."""
    from batch_scaling import main as batch_scaling

    where = Path(args.out).with_name(f"batch_scaling_{args.device}.json")
    sizes = ["--quick"] if args.quick else ["--batch", "64", "--layers", "4", "--width", "256", "--block", "128"]
    sizes += [] if args.quick else ["--steps", "1500", "--eval-every", "50", "--eval-windows", "256"]
    result = batch_scaling(["--device", args.device, *sizes, "--out", str(where)])
    return {"json": where.name, "model": result["model"], "batch": result["batch"], "by_target": result["by_target"]}


PARTS = ("loop", "sharing", "cifar", "breakdown", "scaling")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the path runs (CI, a CPU)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=None)
    ap.add_argument("--cifar", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    ap.add_argument("--cifar-budget-s", type=float, default=None, help="(c): training seconds of both arms")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    ap.add_argument(
        "--add-to",
        default=None,
        help="a JSON an earlier call wrote: its parts are kept ((c) sizes its runs from its (a)), the new ones added",
    )
    args = ap.parse_args(argv)
    quick = args.quick
    args.parts = args.parts or list(PARTS)
    args.image_batches = [16] if quick else [128, 512]
    args.lm_batches = [4] if quick else [16, 64]
    args.block_size = 32 if quick else 256
    args.image_steps = 4 if quick else 200
    args.lm_steps = 4 if quick else 100
    args.peers_on_gpu = [2] if quick else [1, 2, 4]
    # --quick proves each path starts: a language model's Ray runs take the same path as an image model's but one
    args.loop_variants = {"resnet20": LOOP_VARIANTS, "gpt-small": LOOP_VARIANTS[:2] if quick else LOOP_VARIANTS}
    args.cifar_budget_s = args.cifar_budget_s or (1.0 if quick else 220.0)
    args.breakdown_model = "gpt-tiny" if quick else "gpt-small"
    args.breakdown_steps = 8 if quick else 60
    if quick:
        args.cifar = None  # synthetic: a quick run must not need the data folder
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: this machine has no CUDA device (use --device cpu --quick to check the path)")

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    gpus = 1 if args.device == "cuda" else 0
    ray.init(address="local", num_cpus=CORES, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out: dict[str, Any] = {"machine": machine(args.device), "commands": [], "quick": quick, "elapsed_s": {}}
    if args.add_to and Path(args.add_to).exists():
        out = json.loads(Path(args.add_to).read_text())
    out["commands"] = [*out.get("commands", []), command]
    t_all = time.perf_counter()
    try:
        for part in args.parts:
            t0 = time.perf_counter()
            print(f"({'abcde'[PARTS.index(part)]}) {part}", flush=True)
            if part == "loop":
                out["loop"] = part_loop(args)
            elif part == "sharing":
                out["sharing"] = part_sharing(args)
            elif part == "cifar":
                out["cifar"] = part_cifar(args, out.get("loop", []))
            elif part == "breakdown":
                out["breakdown"] = part_breakdown(args)
            else:
                out["scaling"] = part_scaling(args)
            out["elapsed_s"][part] = time.perf_counter() - t0
            print(f"    {part}: {out['elapsed_s'][part]:.0f}s", flush=True)
    finally:
        ray.shutdown()
    out["elapsed_s"]["total"] = out["elapsed_s"].get("total", 0.0) + time.perf_counter() - t_all
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['elapsed_s']['total']:.0f}s)")
    return out


if __name__ == "__main__":
    main()
