"""The experiment's arms, statistics and report, without Ray: trial records in, tables and files out."""

import json
import math

import pytest

from codistill.config import read_yaml
from codistill.config.overrides import parse_set
from codistill.errors import ResourcesError
from codistill.run_plan import prepare_run
from codistill.sweeps.experiment import build_report, fit_to_cluster, format_table, make_plan, spread, to_markdown
from codistill.sweeps.experiment.plot import plot_report
from codistill.sweeps.experiment.stats import paired_difference
from codistill.sweeps.trial import ARM_KEY, trial_overrides
from tests.helpers import ROOT

QUICKSTART = read_yaml(ROOT / "jobs" / "quickstart.yaml")


def test_vary_fields_cross_into_labelled_arms_and_seeds_follow_the_job_seed():
    plan = make_plan(QUICKSTART, ["loss.alpha=0,0.5", "loss.temperature=1,3"], [], seeds=3)
    assert [a.label for a in plan.arms] == [
        "alpha=0,temperature=1",
        "alpha=0,temperature=3",
        "alpha=0.5,temperature=1",
        "alpha=0.5,temperature=3",
    ]
    assert plan.arms[1].overrides == ("loss.alpha=0", "loss.temperature=3")
    assert plan.seeds == (0, 1, 2) and plan.num_trials == 12
    assert make_plan(QUICKSTART, ["loss.alpha=0"], [], seeds=2, first_seed=7).seeds == (7, 8)


def test_named_arms_set_several_fields_and_cross_with_vary():
    plan = make_plan(
        QUICKSTART,
        ["loss.temperature=1,3"],
        ["independent: loss.alpha=0", "checkpoint: exchange.mode=checkpoint exchange.period=50"],
        seeds=1,
    )
    assert [a.label for a in plan.arms][:2] == ["independent/temperature=1", "independent/temperature=3"]
    assert plan.arms[2].overrides == ("exchange.mode=checkpoint", "exchange.period=50", "loss.temperature=1")
    assert plan.varied == ("loss.temperature", "loss.alpha", "exchange.mode", "exchange.period")


@pytest.mark.parametrize(("vary", "arms"), [(["steps=40,80"], []), ([], ["as_is:", "short: steps=20"])])
def test_arms_that_set_steps_run_a_job_that_counts_epochs(vary, arms, tmp_path):
    """`steps` and `epochs` are exclusive: an arm that sets steps replaces the job's epochs, in the plan's check and
    in every trial's job (planned as the trial plans it)."""
    job = {**{k: v for k, v in QUICKSTART.items() if k != "steps"}, "epochs": 2}
    plan = make_plan(job, vary, arms, seeds=2)
    for arm in plan.arms:
        steps = dict(parse_set(arm.overrides)).get("steps")
        for seed in plan.seeds:
            sample = trial_overrides({ARM_KEY: arm.label, "seed": seed}, plan.arm_overrides())
            cfg = prepare_run(plan.base_raw, sample, run_dir=str(tmp_path)).config
            assert (cfg.steps, cfg.epochs, cfg.seed) == (steps, None if steps else 2, seed)


@pytest.mark.parametrize(
    ("vary", "arms", "seeds", "match"),
    [
        (["loss.alpah=0,1"], [], 3, r"--vary: arm 'alpah=0': loss.alpah: unknown key"),
        (["loss.alpha=0,2"], [], 3, r"arm 'alpha=2': loss.alpha: got 2.0; allowed"),
        (["loss.alpha"], [], 3, r"--vary: got 'loss.alpha'; allowed: FIELD=V1,V2"),
        (["loss.alpha=0,0"], [], 3, r"distinct values"),
        (["seed=1,2"], [], 3, r"--seeds N runs every arm"),
        ([], ["no colon loss.alpha=0"], 3, r"--arm: got 'no colon loss.alpha=0'; allowed: NAME: KEY=VALUE"),
        ([], ["a: loss.alpha=0", "a: loss.alpha=1"], 3, r"distinct arm names"),
        ([], [], 3, r"at least one FIELD=V1,V2"),
        (["loss.alpha=0,1"], [], 0, r"--seeds: got 0"),
    ],
)
def test_a_bad_experiment_fails_in_one_line_before_any_trial(vary, arms, seeds, match):
    with pytest.raises(ValueError, match=match):
        make_plan(QUICKSTART, vary, arms, seeds)


def test_values_with_commas_inside_brackets_stay_whole():
    plan = make_plan(QUICKSTART, ["data.synthetic_shape=[1,8,8],[3,8,8]"], [], seeds=1)
    assert [a.overrides for a in plan.arms] == [("data.synthetic_shape=[1,8,8]",), ("data.synthetic_shape=[3,8,8]",)]


def test_spread_is_the_student_t_interval_and_pairs_by_seed():
    s = spread([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2)
    assert s.low == pytest.approx(2 - half) and s.high == pytest.approx(2 + half)
    one = spread([0.5])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.low) and not one.excludes_zero
    # a shift every seed shares is far outside the spread of the seeds, though inside the unpaired intervals
    base = {0: 0.80, 1: 0.85, 2: 0.90}
    arm = {0: 0.81, 1: 0.86, 2: 0.91, 3: 0.5}  # seed 3 has no baseline: left out
    d = paired_difference(arm, base)
    assert d.n == 3 and d.mean == pytest.approx(0.01) and d.sd == pytest.approx(0, abs=1e-12)
    noisy = paired_difference({0: 0.81, 1: 0.84, 2: 0.92}, base)
    assert noisy.mean == pytest.approx(0.02 / 3) and not noisy.excludes_zero


def _trial(arm, seed, acc0, acc1, ens, churn=0.1, kl=0.2):
    return {
        "arm": arm,
        "seed": seed,
        "final": {
            "peer_accuracy": {"peer0-mlp": acc0, "peer1-cnn": acc1},
            "peer_loss": {"peer0-mlp": 0.5, "peer1-cnn": 0.4},
            "mean_peer_accuracy": (acc0 + acc1) / 2,
            "ensemble_accuracy": ens,
            "ensemble_loss": 0.3,
            "churn": churn,
            "mean_pairwise_kl": kl,
        },
        "error": None,
    }


def test_report_tables_every_metric_per_arm_with_paired_differences(tmp_path):
    plan = make_plan(QUICKSTART, ["loss.alpha=0,0.5"], [], seeds=3)
    trials = [
        _trial("alpha=0", 0, 0.90, 0.94, 0.95),
        _trial("alpha=0", 1, 0.91, 0.93, 0.95),
        _trial("alpha=0", 2, 0.92, 0.95, 0.96),
        _trial("alpha=0.5", 0, 0.93, 0.95, 0.96, churn=0.05),
        _trial("alpha=0.5", 1, 0.94, 0.94, 0.96, churn=0.04),
        {"arm": "alpha=0.5", "seed": 2, "final": None, "error": "RayTaskError: boom"},
    ]
    report = build_report(plan, trials, "quickstart", "python -m codistill.experiment ...")
    assert report["metrics"] == [
        "peer0-mlp accuracy",
        "peer1-cnn accuracy",
        "mean peer accuracy",
        "ensemble accuracy",
        "churn",
        "pairwise KL",
    ]
    base, arm = report["arms"]
    assert base["metrics"]["churn"]["delta"] is None and base["seeds"] == [0, 1, 2]
    mlp = arm["metrics"]["peer0-mlp accuracy"]
    assert mlp["spread"]["n"] == 2 and mlp["spread"]["mean"] == pytest.approx(0.935)
    assert mlp["delta"]["n"] == 2 and mlp["delta"]["mean"] == pytest.approx(0.03)  # seeds 0 and 1 only
    assert report["missing"] == [{"arm": "alpha=0.5", "seed": 2, "error": "RayTaskError: boom"}]
    table = format_table(report)
    assert "peer1-cnn accuracy" in table and "baseline" in table and "+0.0300" in table
    assert "inside" in table or "outside" in table
    md = to_markdown(report, "report.png")
    assert md.count("\n| ") >= 12 + 2 and "RayTaskError: boom" in md and "`loss.alpha=0.5`" in md
    assert "| alpha=0.5 | 0.9350 ± 0.0071 (+0.0300*) |" in md  # at a glance: mlp +0.03 on both seeds
    json.dumps(report)  # no NaN, no tuples keys: valid JSON
    assert plot_report(report, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 10_000


def test_language_model_reports_compare_validation_losses():
    plan = make_plan(QUICKSTART, ["loss.alpha=0,0.5"], [], seeds=1)
    final = {
        "peer_accuracy": {"a": None, "b": None},
        "peer_loss": {"a": 2.1, "b": 2.0},
        "ensemble_accuracy": None,
        "ensemble_loss": 1.9,
        "mean_peer_loss": 2.05,
        "churn": 0.3,
        "mean_pairwise_kl": 0.1,
    }
    trials = [{"arm": "alpha=0", "seed": 0, "final": final}, {"arm": "alpha=0.5", "seed": 0, "final": final}]
    report = build_report(plan, trials, "lm", "cmd")
    assert report["metrics"][:4] == ["a val loss", "b val loss", "mean peer val loss", "ensemble val loss"]
    assert report["arms"][1]["metrics"]["a val loss"]["delta"]["mean"] == 0


def test_trials_that_do_not_fit_the_cluster_reserve_less_and_keep_their_threads():
    fitted, note = fit_to_cluster(QUICKSTART, cluster_cpus=2, trial_cpus=0.1)
    assert fitted["resources"] == {"num_cpus": 0.95, "threads_per_peer": 1}
    assert note is not None and "needs 2.1 CPUs" in note
    assert fit_to_cluster(QUICKSTART, cluster_cpus=4, trial_cpus=0.1) == (QUICKSTART, None)
    own = {**QUICKSTART, "peers": [{"model": "mlp", "resources": {"num_cpus": 2}}, {"model": "cnn"}]}
    with pytest.raises(ResourcesError, match="one trial needs 3.1 CPUs"):
        fit_to_cluster(own, cluster_cpus=2, trial_cpus=0.1)


def test_every_package_is_in_the_distribution():
    """pyproject lists packages by hand: a package missing there is missing from every non-editable install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "codistill").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
