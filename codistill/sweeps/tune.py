"""Ray Tune sweeps over any job field.

    python -m codistill.tune --config jobs/tune_temperature.yaml [--set KEY=VALUE ...]
    python -m codistill.tune --config jobs/tune_temperature.yaml --resume     # continue an interrupted sweep

A sweep file is a job plus two sections:

    search:                                  # dotted job keys -> a domain
      loss.temperature: {loguniform: [1, 8]}
      loss.alpha: {uniform: [0, 1]}
      exchange.period: {choice: [1, 10, 100]}
      loss.divergence: {grid: [kl, js]}
    tune:
      num_samples: 4
      max_concurrent_trials: 2
      metric: ensemble_accuracy              # or ensemble_loss, mean_peer_accuracy, mean_peer_loss, churn, ...
      mode: max
      scheduler: none                        # or asha (stops weak trials early on per-round reports)
      trial_cpus: 0.1                        # the trial's own bundle (its driver); one more bundle per peer

Each trial is a whole co-distillation run (RayEngine) whose peers are reserved in the trial's
placement group, so trials never oversubscribe the cluster. Each trial is an MLflow run nested
under one sweep run. The end prints a ranked table and writes the best job as a runnable YAML.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from codistill.config import RunConfig, build, to_dict
from codistill.config.overrides import apply
from codistill.errors import ConfigError
from codistill.locations import resolve_tracking_uri, storage_root, under
from codistill.sweeps.settings import SweepConfig, domain_kind, load_sweep, search_domain
from codistill.sweeps.stop_signals import stop_signals
from codistill.sweeps.trial import fmt, trainable, trial_overrides, trial_title
from codistill.table import text_table
from codistill.trust import add_trust_flag, allow_remote_code

__all__ = ["format_ranking", "main", "run_sweep"]


DATA_PATH_FIELDS = ("root", "train", "test")


def absolute_data_paths(raw: dict) -> dict:
    """A copy whose data paths that exist relative to this directory are absolute: Tune runs each trial in
    its own working directory."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    raw = copy.deepcopy(raw)
    for key in DATA_PATH_FIELDS:
        value = raw["data"].get(key)
        relative = isinstance(value, str) and "://" not in value and not os.path.isabs(os.path.expanduser(value))
        if relative and os.path.exists(value):
            raw["data"][key] = os.path.abspath(value)
    return raw


def trial_name(trial: Any) -> str:
    title = trial_title({k: v for k, v in (trial.config or {}).items()})
    return f"{trial.trial_id}-{title}"[:120].replace("/", "_")


def make_scheduler(settings: SweepConfig, search: dict, seed: int) -> Any:
    """None, ASHA on rounds, or PBT mutating every searched key that is not a grid."""
    from ray import tune

    if settings.scheduler == "asha":
        return tune.schedulers.ASHAScheduler(time_attr="training_iteration", grace_period=settings.grace_period)
    if settings.scheduler == "pbt":
        mutations = {k: search_domain(k, v) for k, v in search.items() if domain_kind(v) != "grid"}
        if not mutations:
            raise ConfigError("tune.scheduler", "pbt", "a search with at least one key that is not a grid")
        return tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=0.5 if settings.num_samples < 4 else 0.25,
            synch=False,
        )
    return None


def trial_resources(cfg: RunConfig, trial_cpus: float):
    """One bundle for the trial's driver plus one per one-worker peer: RayEngine places those peers on the
    bundles after the first. A data-parallel peer's workers are reserved by its own Ray Train run (Train v2
    places them outside the trial's group), so `tune.max_concurrent_trials` is what bounds them."""
    from ray import tune

    bundles = [{"CPU": trial_cpus}]
    for i, pc in enumerate(cfg.peers):
        if pc.workers == 1:
            cpus, gpus = cfg.peer_resources(i)
            bundles.append({"CPU": cpus, **({"GPU": gpus} if gpus else {})})
    strategy = {"pack": "PACK", "spread": "SPREAD"}[cfg.resources.placement]
    return tune.PlacementGroupFactory(bundles, strategy=strategy)


FINAL_KEYS = (
    "ensemble_accuracy",
    "ensemble_loss",
    "churn",
    "mean_pairwise_kl",
    "mean_peer_accuracy",
    "mean_peer_loss",
    "peer_accuracy",
    "peer_loss",
    "step",
)
"""What a finished trial reports last (tune_trial.trainable); a row's `final`."""


def run_sweep(
    base_raw: dict,
    search: dict,
    settings: SweepConfig,
    resume: bool = False,
    arms: dict[str, list[str]] | None = None,
) -> dict:
    """Runs the sweep and returns its rows (one per trial). `arms`: the override sets a searched `arm` key
    names (codistill.experiment)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from codistill.engine import RayEngine
    from codistill.tracking import make_tracker

    base_raw = absolute_data_paths(base_raw)
    base_cfg = build(base_raw)
    RayEngine.init_ray()
    name = settings.name or base_cfg.name
    root = Path(settings.storage_path).expanduser() if settings.storage_path else storage_root() / "tune"
    storage_path = str(root.absolute())
    sweep_dir = str(under(Path(storage_path), name, "tune.name"))
    if base_cfg.tracking.backend == "mlflow" and not base_cfg.tracking.uri:
        base_raw = apply(base_raw, {"tracking.uri": resolve_tracking_uri(None)})  # absolute for trials
        base_cfg = build(base_raw)
    state_file = Path(sweep_dir) / "sweep.json"
    parent_run_id = None
    if resume and state_file.exists():
        parent_run_id = json.loads(state_file.read_text()).get("mlflow_run_id")
    if parent_run_id is None:
        sweep_tracker = make_tracker(base_cfg, run_name=f"sweep-{name}", kind="sweep")
        parent_run_id = sweep_tracker.run_id
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"mlflow_run_id": parent_run_id}))
    param_space = {k: search_domain(k, v) for k, v in search.items()}
    trial_fn = tune.with_resources(
        tune.with_parameters(trainable, base_raw=base_raw, parent_run_id=parent_run_id, arms=arms),
        trial_resources(base_cfg, settings.trial_cpus),
    )
    if resume and tune.Tuner.can_restore(sweep_dir):
        tuner = tune.Tuner.restore(sweep_dir, trial_fn, resume_errored=True, param_space=param_space)
    else:
        scheduler = make_scheduler(settings, search, base_cfg.seed)
        tuner = tune.Tuner(
            trial_fn,
            param_space=param_space,
            # the job's seed seeds the sampler too: the same sweep file draws the same trials
            # (given a search_alg, Tune ignores TuneConfig.max_concurrent_trials: the generator holds it)
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.mode,
                num_samples=settings.num_samples,
                scheduler=scheduler,
                trial_name_creator=trial_name,  # trial names say what they try
                trial_dirname_creator=trial_name,
                search_alg=BasicVariantGenerator(
                    max_concurrent=settings.max_concurrent_trials or 0, random_state=base_cfg.seed
                ),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=1),
        )
    with stop_signals() as stopped_by:
        grid = tuner.fit()
    rows: list[dict[str, Any]] = []
    for result in (grid[i] for i in range(len(grid))):
        if result.config is None:
            continue
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": metrics.get("trial_id") or os.path.basename(result.path or ""),
                "params": dict(result.config),
                "metric": metrics.get(settings.metric),
                "complete": bool(metrics.get("final")),
                "final": {k: metrics[k] for k in FINAL_KEYS if k in metrics} if metrics.get("final") else None,
                "error": str(result.error) if result.error else None,
                "path": result.path,
            }
        )
    sign = -1 if settings.mode == "max" else 1
    rows.sort(key=lambda r: (r["metric"] is None, sign * (r["metric"] if r["metric"] is not None else 0), r["trial"]))
    # an interrupted sweep has no best job: its trials have not all run (--resume finishes it)
    best = None if stopped_by else next((r for r in rows if r["metric"] is not None and r["complete"]), None)
    out: dict[str, Any] = {
        "sweep_dir": sweep_dir,
        "metric": settings.metric,
        "mode": settings.mode,
        "trials": rows,
        "mlflow_parent_run_id": parent_run_id,
        "interrupted": stopped_by[0] if stopped_by else None,  # the signal that stopped the sweep
    }
    if best is not None:
        best_raw = apply(base_raw, trial_overrides(best["params"], arms))
        best_raw["name"] = f"{base_cfg.name}-best"
        best_path = Path(sweep_dir) / "best_job.yaml"
        header = (
            f"# Best trial of sweep {name} ({settings.metric} = {best['metric']:.4f}, {settings.mode}).\n"
            f"# Run it: python -m codistill.run --config {best_path}\n"
        )
        best_path.write_text(header + yaml.safe_dump(to_dict(build(best_raw)), sort_keys=False))
        out["best_job"] = str(best_path)
        out["best"] = best
    _close_parent(base_cfg, parent_run_id, out, search)
    (Path(sweep_dir) / "sweep_results.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def _close_parent(cfg: RunConfig, run_id: str | None, out: dict, search: dict) -> None:
    if cfg.tracking.backend == "none" or run_id is None:
        return
    from codistill.tracking.sweep import close_sweep

    close_sweep(resolve_tracking_uri(cfg.tracking.uri), run_id, cfg.name, out, search)


def format_ranking(out: dict) -> str:
    keys = sorted({k for r in out["trials"] for k in r["params"]})
    header = ["rank", "trial", *(k.split(".")[-1] for k in keys), out["metric"], "status"]
    rows = []
    for i, r in enumerate(out["trials"], 1):
        status = "error" if r["error"] else ("done" if r["complete"] else "stopped")
        rows.append(
            [
                str(i),
                r["trial"],
                *(fmt(r["params"].get(k)) for k in keys),
                "" if r["metric"] is None else f"{r['metric']:.4f}",
                status,
            ]
        )
    return text_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m codistill.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="sweep file: a job plus `search:` and `tune:` sections")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name")
    add_trust_flag(ap)
    args = ap.parse_args(argv)
    if args.trust_remote_code:
        allow_remote_code()
    try:
        base_raw, search, settings = load_sweep(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = run_sweep(base_raw, search, settings, resume=args.resume)
    if out["interrupted"]:
        done = sum(r["complete"] for r in out["trials"])
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        print(
            f"sweep interrupted ({done} of {len(out['trials'])} trials finished); resume it with: "
            f"{shlex.join(['python', '-m', 'codistill.tune', *again, '--resume'])}",
            file=sys.stderr,
        )
        return 128 + out["interrupted"]  # 130 for SIGINT, as a shell reports Ctrl-C
    print(format_ranking(out))
    if "best_job" in out:
        print(f"best job: {out['best_job']}")
    else:
        print("no trial finished", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
