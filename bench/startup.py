"""Start-up of a Parquet job (bench, not a test): seconds from launching the CLI to its first round line.

    python bench/startup.py                                   # Fashion-MNIST from ../shared/datasets, Ray engine
    python bench/startup.py --repo /path/to/other/checkout    # the same job on another checkout (before/after)

`--peers` peers (default 2) on the Ray engine; the time includes Python start, Ray start, data loading and the first
`eval_every` steps (kept small). Writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_round_s(repo: Path, data: Path, steps: int, num_peers: int) -> dict:
    out = tempfile.mkdtemp(prefix="bench-startup-")
    sets = [
        "data.name=parquet",
        f"data.train={data / 'train.parquet'}",
        f"data.test={data / 'test.parquet'}",
        f"steps={steps}",
        f"eval_every={steps}",
        "tracking=none",
        "engine=ray",
        f"resources.num_cpus={min(1.0, 2 / num_peers):g}",  # every peer starts at once on a 2-core machine
        f"peers=[{', '.join(['{model: mlp}'] * num_peers)}]",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_ADDRESS": "local"}
    args = [sys.executable, "-m", "codistill.run", "--output", os.path.join(out, "run")]
    args += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith("round   0"):
            first = time.perf_counter() - t0
    proc.wait()
    return {
        "repo": str(repo),
        "num_peers": num_peers,
        "first_round_s": first,
        "total_s": time.perf_counter() - t0,
        "rc": proc.returncode,
        "tail": "".join(lines[-5:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "fashion_mnist"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peers", type=int, default=2, help="peers of the job, all on this machine")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup.json"))
    args = ap.parse_args()
    row = first_round_s(Path(args.repo), Path(args.data), args.steps, args.peers)
    first, total = row["first_round_s"], row["total_s"]
    print(f"{row['repo']}, {args.peers} peers: first round after {first}s, whole run {total:.1f}s (rc {row['rc']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
