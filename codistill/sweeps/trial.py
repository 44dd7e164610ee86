"""One Tune trial: a whole codistill run whose rounds are Tune's iterations, each reported with a
checkpoint, so an interrupted trial resumes mid-run and population-based training can copy a good
trial's state into a weak one and go on with mutated settings (temperature, alpha, exchange period).

A trial checkpoint is a small directory: the run's `progress.json` and `job.yaml`, `trial.json`
(which trial made it) and each peer's training checkpoint of that round. Restored into a trial, it
becomes the trial's run directory and the run is resumed there with the trial's *own* settings;
state copied from another trial (PBT's exploit) gets the trial's own MLflow runs. A trial that starts
with no checkpoint (a sweep interrupted before the trial's first round, then resumed) starts over from
step 0, and its new MLflow runs replace those of the attempt that was cut off: one run per trial.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from codistill.config import to_dict
from codistill.config.overrides import parse_set
from codistill.engine.report import Reporter, RoundResult
from codistill.run_plan import prepare_run
from codistill.storage import Storage, checkpoint_path

__all__ = ["ARM_KEY", "TuneReporter", "fmt", "trainable", "trial_overrides", "trial_title"]

RUN_FILES = ("progress.json", "job.yaml", "run.json", "tracking.json")

ARM_KEY = "arm"
"""A searched key that names a set of overrides (`arms`) instead of one job field (codistill.sweeps.experiment)."""


def trial_overrides(sample: dict[str, Any], arms: dict[str, list[str]] | None = None) -> list[tuple[str, Any]]:
    """What a trial changes in the sweep's base job, as (dotted key, value) pairs for config.overrides.apply:
    each searched key's sampled value, and in place of the `arm` key its arm's --set items."""
    pairs: list[tuple[str, Any]] = []
    for key, value in sample.items():
        if key == ARM_KEY and arms is not None:
            pairs += parse_set(arms[value])
        else:
            pairs.append((key, value))
    return pairs


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_title(config: dict) -> str:
    """What a trial tries, short: `alpha=0.41,temperature=2.53`."""
    return ",".join(fmt(v) if k == ARM_KEY else f"{k.split('.')[-1]}={fmt(v)}" for k, v in sorted(config.items()))


class TuneReporter(Reporter):
    """Reports every round to Tune (its iteration), with the run's state as a checkpoint, except the last
    round's: a finished run has nothing left to continue, and PBT exploits a trial's *latest* checkpoint,
    so a weak trial that copied a finished one would train no further with its mutated settings (which
    is what happens whenever the trials do not all fit at once and run one after another)."""

    def __init__(self, run_dir: str, trial_id: str, checkpoints: bool):
        self.storage = Storage(run_dir)
        self.trial_id = trial_id
        self.checkpoints = checkpoints
        self.total_steps = 0

    def on_start(self, cfg: Any, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_round(self, result: RoundResult) -> None:
        from ray import tune

        metrics = {**result.metrics, "step": result.step, "round": result.round}
        if not self.checkpoints or result.step >= self.total_steps:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="codistill-trial-") as tmp:
            for name in RUN_FILES:  # progress.json is written before any reporter hears of the round
                data = self.storage.read(name)
                if data is not None:
                    Path(tmp, name).write_bytes(data)
            for p in result.peers:
                data = self.storage.read(checkpoint_path(p.name, p.step))
                if data is not None:
                    target = Path(tmp, checkpoint_path(p.name, p.step))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
            Path(tmp, "trial.json").write_text(json.dumps({"trial_id": self.trial_id}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _restore(checkpoint_dir: str, run_dir: str, trial_id: str) -> None:
    """The trial's run directory from a checkpoint (its own after an interruption, or another trial's)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(checkpoint_dir, run_dir)
    made_by = json.loads(Path(run_dir, "trial.json").read_text())["trial_id"]
    if made_by != trial_id:  # PBT copied another trial's state: this trial keeps its own run id and MLflow runs
        for name in ("run.json", "tracking.json"):
            Path(run_dir, name).unlink(missing_ok=True)


def trainable(
    config: dict, base_raw: dict, parent_run_id: str | None, arms: dict[str, list[str]] | None = None
) -> None:
    """Tune's function trainable: `config` holds only the searched dotted keys (the rest comes through
    `tune.with_parameters`, so Tune's tables show just what is searched; `arms`: the override sets a
    searched `arm` names)."""
    import yaml
    from ray import tune

    from codistill.api import run_job

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    run_dir = os.path.join(ctx.get_trial_dir(), "run")  # Tune writes its own files beside
    cfg = prepare_run(base_raw, trial_overrides(config, arms), run_dir=run_dir).config  # the trial's job
    run_name = f"{cfg.name}-{trial_id}-{trial_title(config)}"  # MLflow, actor names and run.json alike
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:  # from step 0: what an attempt cut off before its first checkpoint left is replaced
        shutil.rmtree(run_dir, ignore_errors=True)  # Tune gives a restored trial the same directory
        if parent_run_id is not None and cfg.tracking.backend == "mlflow":
            from codistill.locations import resolve_tracking_uri
            from codistill.tracking.sweep import drop_earlier_attempts

            drop_earlier_attempts(resolve_tracking_uri(cfg.tracking.uri), parent_run_id, f"{cfg.name}-{trial_id}-")
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            _restore(d, run_dir, trial_id)
        # this trial's settings (PBT may have just changed them) over the checkpoint's
        Path(run_dir, "job.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # planned after job.yaml holds this trial's settings: a resume is checked against them, not the checkpoint's
    plan = prepare_run(cfg, (), checkpoint is not None, run_dir=run_dir, run_name=run_name)
    reporter = TuneReporter(plan.run_dir, trial_id, checkpoints=plan.config.engine == "ray")
    summary = run_job(
        plan.config,
        plan.run_dir,
        reporter,
        resume=plan.resume,
        parent_run_id=parent_run_id,
        run_name=plan.run_id,
    )
    tune.report(
        {
            **(
                {}
                if summary["ensemble"]["test_accuracy"] is None
                else {"ensemble_accuracy": summary["ensemble"]["test_accuracy"]}
            ),
            "ensemble_loss": summary["ensemble"]["test_loss"],
            "churn": summary["churn"],
            "mean_pairwise_kl": summary["mean_pairwise_kl"],
            "mean_peer_accuracy": summary["mean_peer_test_accuracy"],
            "mean_peer_loss": summary["mean_peer_test_loss"],
            "peer_accuracy": {p["name"]: p["test_accuracy"] for p in summary["peers"]},
            "peer_loss": {p["name"]: p["test_loss"] for p in summary["peers"]},
            "step": summary["rounds"][-1]["step"],
            "final": True,
        }
    )
