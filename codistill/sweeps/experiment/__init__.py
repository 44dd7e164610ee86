"""Seeded experiments: one job with and without a change over several seeds, as Ray Tune trials, with a
report of spreads and paired differences (`python -m codistill.experiment`)."""

from codistill.sweeps.experiment.cli import fit_to_cluster, main, run_experiment
from codistill.sweeps.experiment.plan import Arm, ExperimentPlan, make_plan
from codistill.sweeps.experiment.report import build_report, format_table, to_markdown
from codistill.sweeps.experiment.stats import Spread, paired_difference, spread

__all__ = [
    "Arm",
    "ExperimentPlan",
    "Spread",
    "build_report",
    "fit_to_cluster",
    "format_table",
    "main",
    "make_plan",
    "paired_difference",
    "run_experiment",
    "spread",
    "to_markdown",
]
