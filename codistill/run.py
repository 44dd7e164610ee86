"""Train a co-distillation job.

    python -m codistill.run                                  # jobs/quickstart.yaml: 2 peers on digits, ~1 min on CPU
    python -m codistill.run --config jobs/digits_dml.yaml --set loss.alpha=0    # the independent baseline
    python -m codistill.run --set exchange.mode=checkpoint --set exchange.period=20
    python -m codistill.run --resume runs/quickstart-20261122-101500             # continue a run (Ray engine)

Prints progress per round (per peer: step, train loss, test accuracy), a final table, and writes
DIR/summary.json (DIR defaults to runs/<name>-<timestamp>; the path is printed at the end).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import IO, Any

from codistill.config import RunConfig, default_job_path
from codistill.config.overrides import parse_set
from codistill.engine.report import Reporter, RoundResult
from codistill.errors import CodistillError, ConfigError
from codistill.exchange import EXCHANGES
from codistill.run_plan import RunFinishedError, prepare_run
from codistill.table import text_table
from codistill.tasks import TASKS
from codistill.trust import add_trust_flag, allow_remote_code

__all__ = ["ConsoleReporter", "format_table", "main"]


class ConsoleReporter(Reporter):
    """Progress lines per round and a step bar (tqdm) on stderr."""

    def __init__(self, stream: IO[str] | None = None):
        self._stream = stream
        self.bar: Any = None
        self.t0 = time.perf_counter()

    def on_start(self, cfg: RunConfig, total_steps: int) -> None:
        from tqdm import tqdm

        peers = ", ".join(f"{cfg.peer_name(i)}" for i in range(cfg.num_peers))
        ex = cfg.exchange
        detail = EXCHANGES[ex.mode].describe(ex)
        self._print(
            f"codistill {cfg.name}: {cfg.num_peers} peers [{peers}] on {cfg.data.name}, {total_steps} steps, "
            f"exchange={ex.mode} ({detail}, topology={ex.topology}), loss={cfg.loss.divergence} "
            f"T={cfg.loss.temperature} alpha={cfg.loss.alpha} burn_in={cfg.loss.burn_in}, engine={cfg.engine}"
        )
        self.bar = tqdm(
            total=total_steps,
            unit="step",
            desc="slowest peer",
            file=sys.stderr,
            leave=False,
            disable=not sys.stderr.isatty(),
        )

    @property
    def stream(self) -> IO[str]:
        return self._stream or sys.stdout

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def on_round(self, r: RoundResult) -> None:
        if self.bar is not None:
            self.bar.update(r.step - self.bar.n)
        task = TASKS[r.task]
        self._print(
            f"round {r.round:3d} step {r.step:6d} [{time.perf_counter() - self.t0:6.1f}s] {task.headline(r.metrics)}"
        )
        for p in r.peers:
            self._print(
                f"    {p.name:<24} step {p.step:6d}  loss {p.train_loss:.4f}  {task.peer_line(p.eval)}  "
                f"{p.steps_per_s:7.1f} steps/s"
                + (f"  {p.exchange.bytes_published / p.step:,.0f} B/step out" if p.exchange.bytes_published else "")
                + (f"  restarts {p.restarts}" if p.restarts else "")
                + "".join(f"  {k.removeprefix('term.')} {v:.4g}" for k, v in p.terms.items())
            )

    def on_event(self, message: str) -> None:
        self._print(f"  ! {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _number(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _workers(peer: dict) -> str:
    workers = peer.get("workers", 1)
    return f"{workers} {peer['strategy']}" if workers > 1 and "strategy" in peer else str(workers)


def _memory(peer: dict) -> str:
    """Peak memory per rank in MiB and what was measured: `812 cuda`, `590/588 rss`."""
    by_rank = peer.get("peak_memory_mb_by_rank")
    return f"{'/'.join(f'{m:,.0f}' for m in by_rank)} {peer['memory_kind']}" if by_rank else ""


def format_table(summary: dict) -> str:
    """Per-peer results and the ensemble (mean of the peers' probabilities). Losses are nats per example, or
    per token for language models (whose accuracy is next-token accuracy). Training accuracy (data.train_eval)
    is on the labels trained on and, with data.label_noise, on the clean labels."""
    peers = summary["peers"]
    train = [("train acc", "train_accuracy"), ("train acc (clean)", "train_accuracy_clean")]
    train = [(label, key) for label, key in train if any(p.get(key) is not None for p in peers)]
    if summary.get("task") != "classification":
        train = []  # next-token accuracy on training windows says little beside the validation loss
    header = ("peer", "model", "workers", "test acc", "test loss", "ppl", *(label for label, _ in train))
    rows = [(*header, "steps", "samples/s", "peak MiB", "restarts")]
    for p in peers:
        rows.append(
            (
                p["name"],
                p["model"],
                _workers(p),
                f"{p['test_accuracy']:.4f}",
                f"{p['test_loss']:.4f}",
                f"{p.get('perplexity', math.exp(min(p['test_loss'], 700))):.2f}",
                *(_number(p.get(key)) for _, key in train),
                str(p["steps"]),
                f"{p.get('samples_per_s', 0.0):,.0f}",
                _memory(p),
                str(p["restarts"]),
            )
        )
    ens = summary["ensemble"]
    ens_acc = "" if ens.get("test_accuracy") is None else f"{ens['test_accuracy']:.4f}"
    ens_loss = "" if ens.get("test_loss") is None else f"{ens['test_loss']:.4f}"
    ens_ppl = "" if ens.get("test_loss") is None else f"{math.exp(min(ens['test_loss'], 700)):.2f}"
    ensemble = [("ensemble", "mean probs", "", ens_acc, ens_loss, ens_ppl, *("" for _ in train), "", "", "", "")]
    out = [text_table(rows[0], rows[1:], ensemble)]
    names = list(dict.fromkeys(k for p in summary["peers"] for k in p.get("terms", {})))
    if names:  # the last round's mean of each loss term (before its weight) and of the influence weights
        header = ("peer", *(n.removeprefix("term.") for n in names))
        cells = [(p["name"], *(_number(p.get("terms", {}).get(n)) for n in names)) for p in summary["peers"]]
        out.append(text_table(header, cells))
    st = summary["staleness"]
    out.append(
        f"churn {summary['churn']:.4f}   mean pairwise KL {summary['mean_pairwise_kl']:.4f}   "
        f"staleness mean {st['mean']:.1f} max {st['max']}"
        + (f" (teachers up to {st['teacher_lead_max']} steps ahead)" if st["teacher_lead_max"] > 0 else "")
        + f"   bytes exchanged {summary['bytes_exchanged']:,}   "
        f"wall {summary['wall_time_s']:.1f}s"
    )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m codistill.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help=f"a job file, or the name of a bundled job (default: {default_job_path().stem})")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job field by dotted key, e.g. loss.alpha=0 or peers.1.model=cnn (repeatable)",
    )
    ap.add_argument(
        "--output",
        help="run directory, a path or a pyarrow.fs URI such as s3://bucket/run "
        "(default $CODISTILL_STORAGE/runs/<run id>, else ~/codistill/runs/<run id>)",
    )
    ap.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR (its job.yaml; peers restart from the newest round they all can)",
    )
    add_trust_flag(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trust_remote_code:
        allow_remote_code()
    try:
        overrides = [*parse_set(args.overrides), *([("output.dir", args.output)] if args.output else [])]
        plan = prepare_run(args.resume or args.config, overrides, resume=bool(args.resume))
    except RunFinishedError as e:  # nothing to do is not an error
        print(f"codistill: {e}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from codistill.api import RUN_LOG, run_job  # torch, ray and mlflow only to train

    reporter = ConsoleReporter()
    try:
        summary = run_job(plan, reporter=reporter)
    except CodistillError as e:  # what the user caused or can fix; anything else keeps its traceback
        reporter.close()
        log_file = Path(plan.run_dir) / RUN_LOG
        where = f" (details: {log_file})" if log_file.exists() and log_file.stat().st_size else ""
        print(f"error: {e}{where}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        reporter.close()
    print(format_table(summary))
    print(where_it_is(summary, plan.run_dir))
    return 0


def where_it_is(summary: dict, out_dir: str) -> str:
    """The end of every run: where its files and its MLflow run are, and how to look at them."""
    lines = [f"run {summary['run_id']}", f"  run directory: {out_dir}  (summary: {out_dir}/summary.json)"]
    if summary.get("mlflow_run_id"):
        uri = summary["tracking_uri"]
        lines += [
            f"  MLflow: store {uri}, run {summary['mlflow_run_id']}",
            f"  look:   mlflow ui --backend-store-uri {uri}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
