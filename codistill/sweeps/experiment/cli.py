"""`python -m codistill.experiment`: one job, with and without a change, over several seeds, in one command.

    python -m codistill.experiment --config quickstart --vary loss.alpha=0,0.5 --seeds 3 --set steps=200
    python -m codistill.experiment --config fmnist --seeds 3 \\
        --arm "independent: loss.alpha=0" --arm "dml_T3: loss.temperature=3" \\
        --arm "checkpoint_50: exchange.mode=checkpoint exchange.period=50 loss.burn_in=200"
    python -m codistill.experiment ... --baseline longer --baseline ensemble   # compute-matched baselines
    python -m codistill.experiment ... --name <experiment> --resume     # finish an interrupted experiment

Every (arm, seed) pair is one Ray Tune trial (codistill.tune): a whole run whose peers are reserved in the
trial's placement group, as many at once as the cluster holds, each an MLflow run under the experiment's
sweep run. `--vary` fields cross (a grid), `--arm` names a set of overrides; the first arm is the
baseline; `--baseline longer|ensemble` adds compute-matched arms (codistill.sweeps.experiment.plan). Arms
that come to the same job (an `ensemble` baseline and an `alpha=0` arm) share their runs. The end prints, per
metric and arm, the mean, standard deviation and 95% interval over seeds,
and the difference against the baseline paired by seed, and writes report.md, report.json and report.png
beside the trials (also logged to the sweep's MLflow run).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from codistill.config import RunConfig, build, job_path, read_yaml, to_dict
from codistill.config.overrides import apply, parse_set
from codistill.config.schema import NAME_RULE, is_safe_name
from codistill.errors import CodistillError, ConfigError, ResourcesError
from codistill.locations import new_run_id, resolve_tracking_uri, storage_root
from codistill.sweeps.experiment.plan import BASELINES, ExperimentPlan, make_plan
from codistill.sweeps.experiment.plot import plot_report
from codistill.sweeps.experiment.records import enrich_final
from codistill.sweeps.experiment.report import build_report, format_table, to_markdown
from codistill.trust import add_trust_flag, allow_remote_code

__all__ = ["main", "run_experiment", "fit_to_cluster"]


def fit_to_cluster(raw: dict, cluster_cpus: float, trial_cpus: float) -> tuple[dict, str | None]:
    """A job whose one trial fits the cluster: when the trial's bundles (its driver's plus one per one-worker
    peer) need more CPUs than the cluster has, Tune would wait for ever, so each peer reserves less (torch
    threads stay what the job gives, so the trial computes the same); None when nothing changed."""
    cfg = build(raw)
    single = [i for i, p in enumerate(cfg.peers) if p.workers == 1]
    need = trial_cpus + sum(cfg.peer_resources(i)[0] for i in single)
    if need <= cluster_cpus + 1e-9 or not single:
        return raw, None
    own = [i for i in single if getattr(cfg.peers[i].resources, "num_cpus", None) is not None]
    per_peer = math.floor((cluster_cpus - trial_cpus) / len(single) * 100) / 100
    if own or per_peer <= 0:
        raise ResourcesError(
            f"one trial needs {need:g} CPUs (tune trial_cpus {trial_cpus:g} + its peers) and the cluster has "
            f"{cluster_cpus:g}; lower resources.num_cpus (or the peers' own) with --set"
        )
    threads = cfg.peer_threads(single[0])  # the job's resources: no peer has its own here
    fitted = apply(raw, {"resources.num_cpus": per_peer, "resources.threads_per_peer": threads})
    note = (
        f"one trial needs {need:g} CPUs and the cluster has {cluster_cpus:g}: each peer reserves {per_peer:g} CPUs "
        f"(torch threads stay {threads})"
    )
    return fitted, note


def shared_runs(plan: ExperimentPlan) -> dict[str, str]:
    """Each arm's label -> the first arm whose job is the same (itself when none before it is): those share runs."""
    first: dict[str, str] = {}
    out = {}
    for arm in plan.arms:
        job = json.dumps(to_dict(build(apply(plan.base_raw, parse_set(arm.overrides)))), sort_keys=True, default=str)
        out[arm.label] = first.setdefault(job, arm.label)
    return out


def _with_summary(final: dict, trial_path: str | None) -> dict:
    """The trial's final metrics with what its run's summary.json adds (records.enrich_final), when it is there."""
    summary_file = Path(trial_path or "", "run", "summary.json")
    if not trial_path or not summary_file.is_file():
        return final
    return enrich_final(final, json.loads(summary_file.read_text()))


def _sweep_metric(cfg: RunConfig) -> tuple[str, str]:
    """(metric, mode) Tune ranks trials by: mean peer accuracy, or mean peer validation loss for a language model."""
    from codistill.engine.preflight import check_job

    dataset = check_job(cfg)  # the data is there (one line if not) and says what the task is
    return ("mean_peer_accuracy", "max") if dataset.task == "classification" else ("mean_peer_loss", "min")


def run_experiment(
    plan: ExperimentPlan,
    *,
    name: str,
    command: str,
    storage: str | None = None,
    trial_cpus: float = 0.1,
    max_concurrent: int | None = None,
    resume: bool = False,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Runs every (arm, seed) trial through codistill.tune and writes the report; (report, files written)."""
    import ray

    from codistill.engine import RayEngine
    from codistill.sweeps.settings import SweepConfig
    from codistill.sweeps.trial import ARM_KEY
    from codistill.sweeps.tune import run_sweep

    RayEngine.init_ray()
    base_raw, note = fit_to_cluster(plan.base_raw, float(ray.cluster_resources().get("CPU", 0)), trial_cpus)
    if note:
        print(f"note: {note}", flush=True)
    cfg = build(base_raw)
    metric, mode = _sweep_metric(cfg)
    root = Path(storage).expanduser().absolute() if storage else storage_root() / "experiments"
    settings = SweepConfig(
        num_samples=1,
        max_concurrent_trials=max_concurrent or plan.num_trials,
        metric=metric,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        trial_cpus=trial_cpus,
        name=name,
        storage_path=str(root),
    )
    runs_of = shared_runs(plan)
    run_arms = [a.label for a in plan.arms if runs_of[a.label] == a.label]
    for label, source in runs_of.items():
        if label != source:
            print(f"note: arm {label!r} is the same job as {source!r}: it is scored from that arm's runs", flush=True)
    search = {ARM_KEY: {"grid": run_arms}, "seed": {"grid": list(plan.seeds)}}
    out = run_sweep(base_raw, search, settings, resume=resume, arms=plan.arm_overrides())
    ran = [
        {
            "arm": r["params"].get(ARM_KEY),
            "seed": r["params"].get("seed"),
            "trial": r["trial"],
            "final": _with_summary(r["final"], r.get("path")) if r["complete"] else None,
            "error": r["error"],
        }
        for r in out["trials"]
    ]
    trials = [{**t, "arm": label} for label, source in runs_of.items() for t in ran if t["arm"] == source]
    report = build_report(plan, trials, cfg.name, command)
    report["trials"] = trials
    report["interrupted"] = out["interrupted"]  # the signal that stopped it (Ctrl-C: --resume finishes it)
    folder = Path(out["sweep_dir"])
    files = {"md": folder / "report.md", "json": folder / "report.json", "png": folder / "report.png"}
    if not plot_report(report, files["png"]):
        del files["png"]
    files["md"].write_text(to_markdown(report, files["png"].name if "png" in files else None))
    files["json"].write_text(json.dumps(report, indent=2, default=str))
    if cfg.tracking.backend == "mlflow" and out.get("mlflow_parent_run_id"):
        from codistill.tracking.sweep import log_report

        log_report(resolve_tracking_uri(cfg.tracking.uri), out["mlflow_parent_run_id"], report, list(files.values()))
    return report, files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="python -m codistill.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=None, help="a job file or bundled job name (default: quickstart)")
    ap.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2", help="a field and its values")
    ap.add_argument("--arm", action="append", default=[], metavar="'NAME: KEY=VALUE ...'", help="a named arm")
    ap.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=BASELINES,
        help="a compute-matched baseline arm: longer (each peer alone for N x the steps) or ensemble (independent "
        "peers served together)",
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument("--first-seed", type=int, default=None, help="default: the job's seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=None, help="the experiment's name (default: <job>-experiment-<time>)")
    ap.add_argument("--resume", action="store_true", help="finish the experiment --name (its finished trials stay)")
    ap.add_argument("--storage", default=None, help="default: <storage root>/experiments")
    ap.add_argument("--trial-cpus", type=float, default=0.1, help="CPUs of each trial's driver bundle")
    ap.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit)")
    add_trust_flag(ap)
    args = ap.parse_args(argv)
    if args.trust_remote_code:
        allow_remote_code()
    command = shlex.join(["python", "-m", "codistill.experiment", *argv])
    try:
        if args.resume and not args.name:
            raise ConfigError("--resume", message="needs --name: the experiment to finish")
        if args.name is not None and not is_safe_name(args.name):  # a directory under the storage root
            raise ConfigError("--name", args.name, NAME_RULE)
        raw = apply(read_yaml(job_path(args.config)), parse_set(args.overrides))
        job_name = build(raw).name  # the job itself is valid before its arms are checked
        plan = make_plan(raw, args.vary, args.arm, args.seeds, args.first_seed, args.baseline)
        name = args.name or new_run_id(f"{job_name}-experiment")
        runs = len(set(shared_runs(plan).values())) * len(plan.seeds)
        print(f"experiment {name}: {len(plan.arms)} arms x {len(plan.seeds)} seeds, {runs} runs", flush=True)
        report, files = run_experiment(
            plan,
            name=name,
            command=command,
            storage=args.storage,
            trial_cpus=args.trial_cpus,
            max_concurrent=args.max_concurrent,
            resume=args.resume,
        )
    except CodistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    for kind, path in files.items():
        print(f"{kind:>4}: {path}")
    if report["interrupted"]:
        print(f"experiment interrupted; finish it with --name {name} --resume", file=sys.stderr)
        return 128 + report["interrupted"]  # 130 for SIGINT
    if report["missing"]:
        print(
            f"{len(report['missing'])} of {plan.num_trials} runs have no result; finish them with "
            f"--name {name} --resume",
            file=sys.stderr,
        )
        return 1
    return 0
