"""Evidence for the loss terms of issue 13: pairs of runs differing in one field, several seeds each.

Each pair is a bundled job run as it is ("on") and with one field changed ("off"), for every seed, through
`python -m codistill.run` (LocalEngine, no tracking, so one run at a time uses the machine alike). Prints a
table of per-peer test accuracy (images) or validation loss (text), ensemble, churn and wall time, mean and
spread over seeds, and writes every run's numbers to JSON.

    python bench/term_evidence.py --fmnist ../shared/datasets/fashion_mnist          # both pairs, 3 seeds
    python bench/term_evidence.py --pairs text --seeds 0 1 2 --set steps=300
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codistill.table import text_table  # noqa: E402

# name -> (job, the "off" override, what differs, fixed overrides)
PAIRS: dict[str, tuple[str, str, str, list[str]]] = {
    "fmnist_influence": ("fmnist_influence", "loss.weighting=none", "loss.weighting influence vs none", []),
    "fmnist_fitnets": (
        "fmnist_influence",
        "loss.terms=[{name: logits}]",
        "hidden_mse (feature maps) on vs off",
        ["loss.weighting=none", "loss.terms=[{name: logits}, {name: hidden_mse, weight: 0.5}]"],
    ),
    "text_tinybert": (
        "lm_tinybert",
        "loss.terms=[{name: logits}]",
        "hidden_mse + attention_kl on vs off",
        [],
    ),
}


def run_one(job: str, overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "codistill.run", "--config", job, "--out", str(out)]
    for o in ["engine=local", "tracking=none", *overrides]:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "peers": {
            p["name"]: {"test_accuracy": p["test_accuracy"], "test_loss": p["test_loss"]} for p in summary["peers"]
        },
        "ensemble_accuracy": summary["ensemble"]["test_accuracy"],
        "ensemble_loss": summary["ensemble"]["test_loss"],
        "churn": summary["churn"],
        "wall_time_s": summary["wall_time_s"],
        "process_s": time.perf_counter() - t0,
        "terms": {p["name"]: p.get("terms", {}) for p in summary["peers"]},
    }


def _ms(values: list[float], digits: int = 4) -> str:
    if not values or any(v is None for v in values):
        return ""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fmnist", default=str(ROOT.parent / "shared" / "datasets" / "fashion_mnist"))
    ap.add_argument("--set", action="append", default=[], help="an override for every run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "term_evidence.json"))
    args = ap.parse_args()
    fm = Path(args.fmnist)
    results: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs:
            job, off, what, fixed = PAIRS[name]
            data = (
                [f"data.train={fm / 'train.parquet'}", f"data.test={fm / 'test.parquet'}"] if "fmnist" in name else []
            )
            results[name] = {"differs": what, "on": [], "off": []}
            for arm, extra in (("on", []), ("off", [off])):
                for seed in args.seeds:
                    out = Path(tmp) / f"{name}-{arm}-{seed}"
                    r = run_one(job, [*data, *fixed, f"seed={seed}", *args.set, *extra], out)
                    r["seed"] = seed
                    results[name][arm].append(r)
                    print(
                        f"{name} {arm} seed {seed}: ensemble acc {r['ensemble_accuracy']} loss "
                        f"{r['ensemble_loss']:.4f} churn {r['churn']:.4f} wall {r['wall_time_s']:.1f}s",
                        flush=True,
                    )
                runs = results[name][arm]
                text = runs[0]["ensemble_accuracy"] is None
                metric = "test_loss" if text else "test_accuracy"
                peer_cells = [f"{p}: {_ms([r['peers'][p][metric] for r in runs])}" for p in runs[0]["peers"]]
                rows.append(
                    (
                        name,
                        arm,
                        metric.replace("test_", "peer "),
                        "; ".join(peer_cells),
                        _ms([r["ensemble_loss" if text else "ensemble_accuracy"] for r in runs]),
                        _ms([r["churn"] for r in runs]),
                        _ms([r["wall_time_s"] for r in runs], 1),
                    )
                )
                save(args, results)  # after every arm: a long evidence run loses nothing it finished
    header = ("pair", "arm", "metric", "per peer (mean ± sd over seeds)", "ensemble", "churn", "wall s")
    print(text_table(header, rows))
    print(f"wrote {args.out}")


def save(args: argparse.Namespace, results: dict) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "overrides": args.set, "pairs": results}, indent=1))


if __name__ == "__main__":
    main()
