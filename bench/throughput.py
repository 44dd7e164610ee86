"""Throughput against the loop a user would write, and the exchange's cost as the number of peers grows.

    python bench/throughput.py                                   # both parts; writes bench/results/throughput.json
    python bench/throughput.py --part loop --models mlp --batch-sizes 64 --out /tmp/t.json
    python bench/throughput.py --part scaling --peers 2 3 4
    python bench/throughput.py --part sharing --out bench/results/gpu_sharing_resnet20.json     # a GPU machine

loop: in one run, peer-samples/s (examples one peer trains on, summed over the peers, per second of
training) of two equal peers trained by
  (a) a plain one-process PyTorch DML loop: one forward per model, cross-entropy plus KL to the other's
      detached logits at temperature T, one backward, SGD; all cores to torch (the baseline),
  (b) codistill's LocalEngine (both peers in this process, all cores),
  (c) codistill's RayEngine, one actor per peer with half the cores each, in logits and checkpoint mode,
  (d) the RayEngine with `alpha: 0` (no exchange),
on CIFAR-shaped synthetic data (3x32x32, 10 classes, in memory), for mlp, cnn and resnet20 at batch 64
and 256. Training time is each variant's own: (a) the loop's wall time; (b) the peers' busy time (steps,
not evaluation); (c, d) the slowest peer's busy time (peers train at the same time). Start-up (Ray, actors,
data) is reported apart as end-to-end wall time.

scaling: 2, 3 and 4 mlp peers (`all` and `ring`, logits and checkpoint mode) on the RayEngine: per peer
and step, the time spent in exchange (publish + pull + wait), the teachers' forward passes (checkpoint
mode) and the bytes published and pulled; then a line fitted against each peer's number of teachers,
read at 8 and 16 peers (per peer, and summed over the peers: what the board and the network carry).

sharing (a GPU machine): images/s of 1, 2 and 4 ResNet-20 peers sharing one GPU (fractional `num_gpus`)
against the plain loop training two of them on the same GPU. `--device cuda` runs the loop part there too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1


def base_job(model: str, batch_size: int, steps: int, num_peers: int = 2, device: str = "cpu") -> dict[str, Any]:
    return {
        "name": "bench-throughput",
        "seed": 0,
        "steps": steps,
        "eval_every": steps,
        "engine": "ray",
        "device": device,
        "data": {
            "name": "synthetic",
            "batch_size": batch_size,
            "synthetic_train": 8192,
            "synthetic_shape": [3, 32, 32],
            "eval_batch_size": 1024,
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant"},
        "peers": [{"model": model}] * num_peers,
        "loss": {"alpha": 0.5, "temperature": 3.0, "divergence": "kl"},
        "exchange": {"mode": "logits", "staleness": 0},
        "tracking": "none",
    }


def plain_loop(raw: dict, variant: str = "plain loop") -> dict[str, Any]:
    """(a): what a user writes by hand for DML on tensors in memory: one forward per model, cross-entropy plus KL
    to the others' detached logits, one backward, the job's optimiser (SGD or AdamW); on CUDA with `amp: true`, bf16
    autocast as codistill uses it. Language models: next-token targets, every position an example."""
    import torch
    import torch.nn.functional as F

    from codistill import config as C
    from codistill.data import load_dataset
    from codistill.models import build_model
    from codistill.tasks import task_of

    cfg = C.build(raw)
    torch.set_num_threads(CORES)
    t_start = time.perf_counter()
    device = torch.device("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    ds = load_dataset(cfg.data)
    task = task_of(ds)
    lm = task.name == "causal_lm"
    x_all, y_all = ds.train_x.to(device), ds.train_y.to(device)
    torch.manual_seed(cfg.seed)
    shape = task.input_shape(ds)
    models = [build_model(p.model, shape, ds.num_classes, model_args=p.model_args).to(device) for p in cfg.peers]
    oc = cfg.optim
    if oc.name == "adamw":
        opts: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(m.parameters(), lr=oc.lr, weight_decay=oc.weight_decay) for m in models
        ]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=oc.lr, momentum=oc.momentum, weight_decay=5e-4) for m in models]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    alpha, temp, b = cfg.loss.alpha, cfg.loss.temperature, cfg.data.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(x_all), generator=gen).to(device)
    t0 = time.perf_counter()
    for step in range(int(raw["steps"])):
        start = (step * b) % (len(x_all) - b + 1)
        idx = order[start : start + b]
        if lm:  # next tokens, or a chat corpus's own labels (-100 on prompts: F.cross_entropy's ignore_index)
            x, y = x_all[idx, :-1], (y_all[idx] if y_all.ndim == 2 else x_all[idx, 1:])
        else:
            x, y = x_all[idx], y_all[idx]
        with autocast:
            logits = [m(x).flatten(0, -2).float() for m in models]  # one forward each; (B [* T], C)
        targets = y.flatten()
        total = torch.zeros((), device=device)
        for i, z in enumerate(logits):
            others = [logits[j].detach() for j in range(len(models)) if j != i]
            kl = sum(
                F.kl_div(F.log_softmax(z / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean", log_target=True)
                for t in others
            )
            total = total + (1 - alpha) * F.cross_entropy(z, targets) + alpha * temp**2 * kl / len(others)
        for o in opts:
            o.zero_grad(set_to_none=True)
        total.backward()
        for o in opts:
            o.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    return _row(variant, cfg, train_s, time.perf_counter() - t_start)


def _row(variant: str, cfg, train_s: float, wall_s: float, extra: dict | None = None) -> dict[str, Any]:
    samples = cfg.num_peers * (cfg.steps or 0) * cfg.data.batch_size
    return {
        "variant": variant,
        "model": cfg.peers[0].model,
        "batch_size": cfg.data.batch_size,
        "num_peers": cfg.num_peers,
        "steps": cfg.steps,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "wall_s": wall_s,
        **(extra or {}),
    }


def codistill_local(raw: dict) -> dict[str, Any]:
    import torch

    from codistill import config as C
    from codistill.engine import LocalEngine, build_summary

    cfg = C.build({**raw, "engine": "local"})
    torch.set_num_threads(CORES)
    t0 = time.perf_counter()
    history = LocalEngine(cfg).run()
    s = build_summary(cfg, history, time.perf_counter() - t0)
    return _row("LocalEngine", cfg, sum(p["busy_s"] for p in s["peers"]), time.perf_counter() - t0)


def codistill_ray(raw: dict, variant: str, sets: list[str]) -> dict[str, Any]:
    from codistill import config as C
    from codistill.engine import RayEngine, build_summary

    n = len(raw["peers"])
    per_peer = max(1, CORES // n)
    resources = [f"resources.num_cpus={CORES / n}", f"resources.threads_per_peer={per_peer}"]
    if raw.get("device") == "cuda":  # the peers share one GPU (fractional GPUs)
        resources.append(f"resources.num_gpus={1 / n}")
    cfg = C.build(C.apply_overrides(raw, [*resources, *sets]))
    t0 = time.perf_counter()
    history = RayEngine(cfg).run(tempfile.mkdtemp(prefix="bench-throughput-"))
    s = build_summary(cfg, history, time.perf_counter() - t0)
    peer_steps = len(s["peers"]) * max(1, cfg.steps or 0)  # per peer and step: the sums over peers over this
    extra = {
        "exchange_ms_per_step": 1000 * sum(p["exchange_s"] for p in s["peers"]) / peer_steps,
        "bytes_per_peer_step": s["bytes_exchanged"] / peer_steps,
        "teacher_forward_ms_per_step": 1000 * sum(p["teacher_forward_s"] for p in s["peers"]) / peer_steps,
    }
    return _row(variant, cfg, max(p["busy_s"] for p in s["peers"]), time.perf_counter() - t0, extra)


LOOP_VARIANTS = [
    ("LocalEngine", None),
    ("Ray logits", ["exchange.mode=logits"]),
    ("Ray checkpoint p10", ["exchange.mode=checkpoint", "exchange.period=10"]),
    ("Ray alpha=0", ["loss.alpha=0"]),
]


def loop(args) -> list[dict]:
    rows = []
    for model in args.models:
        for b in args.batch_sizes:
            base = {"mlp": 300, "cnn": 120, "resnet20": 40}.get(model, 60)  # at batch 64; half as many at 256
            steps = args.steps or max(10, base * 128 // max(b, 128))
            raw = base_job(model, b, steps, device=args.device)
            group = [plain_loop(raw)]
            for label, sets in LOOP_VARIANTS:
                group.append(codistill_local(raw) if sets is None else codistill_ray(raw, label, sets))
            for r in group:
                r["ratio_vs_plain"] = r["samples_per_s"] / group[0]["samples_per_s"]
                print(
                    f"  {model:<9} b={b:<4} {r['variant']:<20} {r['samples_per_s']:9.1f} samples/s  "
                    f"ratio {r['ratio_vs_plain']:.2f}  (train {r['train_s']:.1f}s, wall {r['wall_s']:.1f}s)",
                    flush=True,
                )
            rows += group
    return rows


def scaling(args) -> list[dict]:
    rows = []
    for mode, sets in (("logits", ["exchange.mode=logits"]), ("checkpoint", ["exchange.mode=checkpoint"])):
        for topology in ("all", "ring"):
            for n in args.peers:
                if topology == "ring" and n == 2:
                    continue  # the ring of two is `all`
                raw = base_job("mlp", 64, args.scaling_steps, num_peers=n)
                r = codistill_ray(raw, f"{mode} {topology}", [*sets, f"exchange.topology={topology}"])
                r.update(mode=mode, topology=topology)
                print(
                    f"  {mode:<10} {topology:<4} N={n}  exchange {r['exchange_ms_per_step']:7.2f} ms/step/peer  "
                    f"{r['bytes_per_peer_step'] / 1024:8.1f} KiB/step/peer  teacher forward "
                    f"{r['teacher_forward_ms_per_step']:6.2f} ms/step/peer",
                    flush=True,
                )
                rows.append(r)
    return rows


def sharing(args) -> list[dict]:
    """1, 2 and 4 peers of one model sharing one GPU (fractional GPUs, DML at alpha 0.5; one peer alone trains
    plainly), against the plain loop training two of them on the same GPU."""
    rows = [plain_loop(base_job(args.sharing_model, args.sharing_batch, args.sharing_steps, device="cuda"))]
    for n in args.peers_on_gpu:
        raw = base_job(args.sharing_model, args.sharing_batch, args.sharing_steps, num_peers=n, device="cuda")
        rows.append(codistill_ray(raw, f"{n} peer(s) on one GPU", ["loss.alpha=0"] if n == 1 else []))
    for r in rows:
        r["ratio_vs_plain"] = r["samples_per_s"] / rows[0]["samples_per_s"]
        r["samples_per_s_per_peer"] = r["samples_per_s"] / r["num_peers"]
        print(
            f"  {r['variant']:<24} {r['samples_per_s']:9.1f} images/s  ({r['samples_per_s_per_peer']:.1f} per peer)  "
            f"ratio {r['ratio_vs_plain']:.2f}",
            flush=True,
        )
    return rows


def extrapolate(rows: list[dict], to_peers: tuple[int, ...] = (8, 16)) -> list[dict]:
    """Per (mode, topology): a least-squares line of the measured per-peer exchange time and bytes per step
    against the number of teachers a peer has (N - 1 for `all`, 1 for `ring`), read at 8 and 16 peers. On
    paper: a peer's traffic grows as its teachers (N for `all`, constant for `ring`), the board's (and the
    cluster's) as the sum over peers (N^2 for `all`, N for `ring`)."""
    out = []
    for mode in sorted({r["mode"] for r in rows}):
        for topology in ("all", "ring"):
            group = [r for r in rows if r["mode"] == mode and r["topology"] == topology]
            if len(group) < 2:
                continue
            teachers = [r["num_peers"] - 1 if topology == "all" else 1 for r in group]
            for key in ("exchange_ms_per_step", "bytes_per_peer_step", "teacher_forward_ms_per_step"):
                ys = [r[key] for r in group]
                mx, my = sum(teachers) / len(teachers), sum(ys) / len(ys)
                var = sum((t - mx) ** 2 for t in teachers)
                slope = sum((t - mx) * (y - my) for t, y in zip(teachers, ys)) / var if var else 0.0
                for n in to_peers:
                    k = n - 1 if topology == "all" else 1
                    per_peer = my + slope * (k - mx)
                    out.append(
                        {
                            "mode": mode,
                            "topology": topology,
                            "num_peers": n,
                            "quantity": key,
                            "per_peer": per_peer,
                            "all_peers": per_peer * n,
                        }
                    )
    return out


def loop_table(rows: list[dict]) -> str:
    from codistill.table import text_table

    header = ["model", "batch", "variant", "samples/s", "vs plain loop", "train s", "wall s"]
    body = [
        [
            r["model"],
            str(r["batch_size"]),
            r["variant"],
            f"{r['samples_per_s']:.0f}",
            f"{r['ratio_vs_plain']:.2f}",
            f"{r['train_s']:.1f}",
            f"{r['wall_s']:.1f}",
        ]
        for r in rows
    ]
    return text_table(header, body)


def scaling_table(rows: list[dict]) -> str:
    from codistill.table import text_table

    header = ["mode", "topology", "peers", "exchange ms/step/peer", "KiB/step/peer", "teacher fwd ms/step/peer"]
    body = [
        [
            r["mode"],
            r["topology"],
            str(r["num_peers"]),
            f"{r['exchange_ms_per_step']:.2f}",
            f"{r['bytes_per_peer_step'] / 1024:.1f}",
            f"{r['teacher_forward_ms_per_step']:.2f}",
        ]
        for r in rows
    ]
    return text_table(header, body)


def extrapolated_table(rows: list[dict]) -> str:
    from codistill.table import text_table

    units = {"exchange_ms_per_step": ("exchange ms/step", 1.0), "bytes_per_peer_step": ("KiB/step", 1 / 1024)}
    units["teacher_forward_ms_per_step"] = ("teacher fwd ms/step", 1.0)
    header = ["mode", "topology", "peers", "quantity", "per peer", "all peers (board)"]
    body = [
        [
            r["mode"],
            r["topology"],
            str(r["num_peers"]),
            units[r["quantity"]][0],
            f"{r['per_peer'] * units[r['quantity']][1]:.2f}",
            f"{r['all_peers'] * units[r['quantity']][1]:.2f}",
        ]
        for r in rows
    ]
    return text_table(header, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["loop", "scaling", "sharing", "all"], default="all")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="loop: where every variant trains")
    ap.add_argument("--sharing-model", default="resnet20")
    ap.add_argument("--sharing-batch", type=int, default=128)
    ap.add_argument("--sharing-steps", type=int, default=300)
    ap.add_argument("--peers-on-gpu", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet20"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    ap.add_argument(
        "--steps", type=int, default=None, help="default: by model (mlp 300, cnn 120, resnet20 40; half at batch 256)"
    )
    ap.add_argument("--peers", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--scaling-steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=CORES, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {
        "machine": {"cpus": CORES, "platform": platform.platform(), "python": platform.python_version()},
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
    }
    if args.part in ("loop", "all"):
        print("loop: peer-samples/s against a plain PyTorch DML loop", flush=True)
        out["loop"] = loop(args)
        print(loop_table(out["loop"]))
    if args.part in ("scaling", "all"):
        print("scaling: exchange cost per peer as the number of peers grows", flush=True)
        out["scaling"] = scaling(args)
        print(scaling_table(out["scaling"]))
        out["extrapolated"] = extrapolate(out["scaling"])
        print(extrapolated_table(out["extrapolated"]))
    if args.part == "sharing":  # a GPU machine only (not part of `all`)
        print("sharing: peers on one GPU against the plain loop on it", flush=True)
        out["sharing"] = sharing(args)
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
