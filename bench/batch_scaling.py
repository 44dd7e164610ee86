"""Anil et al.'s batch-size claim, simulated on one machine (Large scale distributed neural network training through
online distillation, ICLR 2018, sec. 3.1 and fig. 2): past the batch size where synchronous SGD stops improving per
step, two models co-distilling at batch B each reach a target loss in fewer steps than one model at batch 2B, which
reads the same examples per step. Bench, not a test.

One small GPT on the offline corpus (byte tokens of Python's standard library sources) is trained alone at batch
B/2, B, 2B and 4B, and two of them co-distil by checkpoint exchange (a stale period, burn-in) at batch B each; every
run evaluates the validation loss every few steps. "One model" is the mean of the same two models (the same two
initialisations and batch orders as the pair) each trained alone (`alpha: 0`): early in training one seed's curve
moves by more than the effect, and this way the pair differs from the single models only by distilling. From the
curves: the steps each run needs to reach target losses (linear between evaluations), the speed-up of each
doubling of the batch (2.0 = perfect scaling, 1.0 = none), the batch past which doubling no longer gives 1.5x,
and whether the pair at B beats one model at 2B.

    python bench/batch_scaling.py                       # CPU: about 12 minutes; bench/results/batch_scaling.{json,png}
    python bench/batch_scaling.py --device cuda --batch 64 --width 256 --layers 4 --steps 2000   # on a GPU
    python bench/batch_scaling.py --quick               # seconds: the plumbing only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

from codistill import config as C
from codistill.engine import LocalEngine
from codistill.table import text_table

ROOT = Path(__file__).resolve().parent.parent
SPEEDUP_THRESHOLD = 1.5
"""A doubling of the batch 'still pays' while it cuts the steps to the target by at least this factor."""


def job(args: argparse.Namespace, batch: int, distill: bool, seed: int) -> C.RunConfig:
    gpt = {"model": "gpt", "model_args": {"n_layer": args.layers, "n_head": 4, "n_embd": args.width, "dropout": 0.0}}
    raw = {
        "name": "batch-scaling",
        "seed": seed,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "engine": "local",
        "device": args.device,
        "data": {
            "name": "text",
            "tokenizer": "byte",
            "block_size": args.block,
            "batch_size": batch,
            "eval_batch_size": 64,
            "max_chars": args.max_chars,
            "limit_test": args.eval_windows,
            "train_eval": 0,
        },
        # constant lr after warm-up: steps to a loss compare optimisers, not schedules tied to a run's length
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 30},
        "peers": [gpt, gpt],  # alone (alpha 0) or co-distilling: the same two models
        "loss": {"alpha": args.alpha if distill else 0.0, "temperature": 1.0, "burn_in": args.burn_in},
        "exchange": {"mode": "checkpoint", "period": args.period},
        "tracking": "none",
    }
    return C.build(raw)


def curve(cfg: C.RunConfig) -> tuple[list[tuple[int, float]], float]:
    """(step, mean peer validation loss) at every evaluation, and the run's wall time."""
    t0 = time.perf_counter()
    history = LocalEngine(cfg).run()
    return [(h.step, float(h.metrics["mean_peer_loss"])) for h in history], time.perf_counter() - t0


def steps_to(points: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the loss reaches `target`, linear between evaluations (None: never)."""
    prev_step, prev_loss = 0, math.inf
    for step, loss in points:
        if loss <= target:
            if not math.isfinite(prev_loss):
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def critical_batch(singles: dict[int, float | None]) -> tuple[dict[str, float | None], int | None]:
    """Speed-up of each doubling (steps at b / steps at 2b) and the first batch b whose doubling gives less than
    SPEEDUP_THRESHOLD (None: every doubling still pays)."""
    sizes = sorted(singles)
    speedups: dict[str, float | None] = {}
    critical = None
    for b, b2 in itertools.pairwise(sizes):
        s, s2 = singles[b], singles[b2]
        speedups[f"{b}->{b2}"] = None if s is None or s2 is None or s2 == 0 else s / s2
        value = speedups[f"{b}->{b2}"]
        if critical is None and value is not None and value < SPEEDUP_THRESHOLD:
            critical = b
    return speedups, critical


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for i, run in enumerate(result["runs"]):
        steps, losses = zip(*run["curve"])
        style = "--" if run["peers"] > 1 else "-"
        left.plot(steps, losses, style, color=f"C{i}", label=run["label"])
        right.plot([s * run["examples_per_step"] for s in steps], losses, style, color=f"C{i}", label=run["label"])
    for ax in (left, right):
        for target in result["targets"]:
            ax.axhline(target, color="0.7", lw=0.8, ls=":")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    left.set_xlabel("step")
    right.set_xlabel("training sequences read (all models together)")
    left.set_title("per step (dotted: the target losses)", fontsize=10)
    right.set_title("per example read", fontsize=10)
    left.legend(fontsize=8)
    fig.suptitle(
        f"Anil et al.'s claim on one machine: GPT {result['model']}, {result['device']}; pair = checkpoint exchange "
        f"every {result['period']} steps",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="B: the pair's batch per model (default 32)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--period", type=int, default=50, help="the pair's checkpoint exchange period")
    ap.add_argument("--burn-in", type=int, default=100)
    ap.add_argument("--max-chars", type=int, default=1_000_000)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps of a tiny model: the plumbing only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch_scaling.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.layers, args.width, args.batch = 40, 10, 1, 32, 4
        args.burn_in, args.period, args.max_chars, args.eval_windows = 10, 10, 100_000, 16
    b = args.batch
    plans = [(f"1 model, batch {s}", s, False) for s in (b // 2, b, 2 * b, 4 * b) if s >= 1]
    plans.append((f"2 co-distilling, batch {b} each", b, True))
    runs = []
    for label, batch, distill in plans:
        points, wall = curve(job(args, batch, distill, args.seed))
        peers = 2 if distill else 1  # models whose reads one step of this arm counts
        runs.append(
            {"label": label, "batch": batch, "peers": peers, "examples_per_step": batch * peers, "curve": points}
        )
        print(f"{label}: final loss {points[-1][1]:.4f} in {wall:.0f}s", flush=True)
        runs[-1]["wall_s"] = wall
    # targets every run reaches: from the loss the worst run ends at (its best) up to a third of the way back
    reachable = max(min(loss for _, loss in r["curve"]) for r in runs)
    start = min(r["curve"][0][1] for r in runs)
    targets = [reachable + f * (start - reachable) for f in (1 / 3, 1 / 6, 0.0)]
    for r in runs:
        r["steps_to_target"] = [steps_to(r["curve"], t) for t in targets]
    singles = {r["batch"]: r for r in runs if r["peers"] == 1}
    by_target = []
    for i, target in enumerate(targets):
        speedups, critical = critical_batch({size: r["steps_to_target"][i] for size, r in singles.items()})
        pair = next(r for r in runs if r["peers"] == 2)["steps_to_target"][i]
        one_at_2b = singles[2 * b]["steps_to_target"][i]
        by_target.append(
            {
                "target": target,
                "speedup_per_doubling": speedups,
                "critical_batch": critical,
                "pair_steps": pair,
                "single_2b_steps": one_at_2b,
                "pair_beats_2b": None if pair is None or one_at_2b is None else pair < one_at_2b,
            }
        )
    result = {
        "device": args.device,
        "model": f"{args.layers}x{args.width}",
        "block": args.block,
        "batch": b,
        "period": args.period,
        "burn_in": args.burn_in,
        "steps": args.steps,
        "seed": args.seed,
        "targets": targets,
        "runs": runs,
        "by_target": by_target,
        "command": "python bench/batch_scaling.py" + (" --quick" if args.quick else ""),
    }
    header = ["run", "examples/step", *(f"steps to {t:.3f}" for t in targets), "final loss"]
    rows = [
        [r["label"], str(r["examples_per_step"]), *(_num(s) for s in r["steps_to_target"]), f"{r['curve'][-1][1]:.4f}"]
        for r in runs
    ]
    print(text_table(header, rows))
    for t in by_target:
        doublings = ", ".join(f"{k}: {_num(v, 2)}x" for k, v in t["speedup_per_doubling"].items())
        print(
            f"target {t['target']:.3f}: speed-up per doubling {doublings}; doubling stops paying "
            f"({SPEEDUP_THRESHOLD}x) past batch {t['critical_batch'] or 'none of these'}; pair at {b}: "
            f"{_num(t['pair_steps'])} steps, one model at {2 * b}: {_num(t['single_2b_steps'])}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
