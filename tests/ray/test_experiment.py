"""`python -m codistill.experiment` end to end: a 2-arm x 2-seed grid of whole runs through Tune, the report
checked against the trials' own summaries, logged to MLflow, and rebuilt by --resume without training."""

import json

import mlflow
import pytest
import yaml

from codistill.sweeps.experiment import main

pytestmark = pytest.mark.slow


def test_experiment_runs_a_seeded_grid_reports_it_and_resumes(ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # each trial's peers train in its own process (engine: local): Tune, MLflow and the report are what is
    # tested here, and a trial then takes seconds rather than the ~18 s of starting its own actors on 2 cores
    sets = ["steps=30", "eval_every=15", f"tracking.uri={uri}", "resources.num_cpus=0.45", "engine=local"]
    argv = ["--config", "quickstart", "--vary", "loss.alpha=0,0.5", "--seeds", "2", "--baseline", "longer"]
    argv += ["--baseline", "ensemble"]
    argv += ["--name", "exp", "--storage", str(tmp_path / "exp"), *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # the ensemble baseline is the alpha=0 arm's job: 3 distinct arms x 2 seeds run
    assert "4 arms x 2 seeds, 6 runs" in out and "ensemble accuracy" in out and "Δ vs baseline" in out
    folder = tmp_path / "exp" / "exp"
    report = json.loads((folder / "report.json").read_text())
    assert [a["label"] for a in report["arms"]] == ["alpha=0", "alpha=0.5", "longer_x2", "ensemble"]
    assert report["seeds"] == [0, 1]
    assert not report["missing"] and all(a["seeds"] == [0, 1] for a in report["arms"])
    assert (folder / "report.md").read_text().startswith("# Experiment: quickstart")
    assert (folder / "report.png").stat().st_size > 10_000

    # every number in the report is a trial's own result: each trial's run wrote its job and summary
    by_job: dict[tuple, dict] = {}
    for summary_path in folder.glob("*/run/summary.json"):
        job = yaml.safe_load((summary_path.parent / "job.yaml").read_text())
        by_job[(job["loss"]["alpha"], job["seed"], job["steps"])] = json.loads(summary_path.read_text())
    longer = {seed: by_job.pop((0.0, seed, 60)) for seed in (0, 1)}  # each peer alone for twice the steps
    assert sorted(by_job) == [(0.0, 0, 30), (0.0, 1, 30), (0.5, 0, 30), (0.5, 1, 30)]
    runs = {key[:2]: s for key, s in by_job.items()}
    base, arm, longer_arm, ensemble = report["arms"]
    # a baseline's compute is what its runs did: steps counted by the peers, not the plan's arithmetic
    assert [p["steps"] for p in longer[0]["peers"]] == [60, 60]
    assert longer_arm["compute"]["peer_steps"] == sum(p["steps"] for p in longer[0]["peers"]) == 120
    assert base["compute"]["peer_steps"] == sum(p["steps"] for p in runs[(0.0, 0)]["peers"]) == 60
    assert ensemble["compute"] == {**base["compute"], "inference_models": 2}
    assert ensemble["metrics"]["served accuracy"]["per_seed"]["1"] == runs[(0.0, 1)]["ensemble"]["test_accuracy"]
    assert longer_arm["metrics"]["mean peer accuracy"]["per_seed"]["0"] == longer[0]["mean_peer_test_accuracy"]
    curve = longer_arm["curve"]["points"]
    assert [p["step"] for p in curve] == [15, 30, 45, 60] and curve[-1]["n"] == 2
    for alpha, entry in ((0.0, base), (0.5, arm)):
        for seed in (0, 1):
            s = runs[(alpha, seed)]
            m = entry["metrics"]
            assert m["ensemble accuracy"]["per_seed"][str(seed)] == s["ensemble"]["test_accuracy"]
            assert m["churn"]["per_seed"][str(seed)] == s["churn"]
            for p in s["peers"]:
                assert m[f"{p['name']} accuracy"]["per_seed"][str(seed)] == p["test_accuracy"]
    assert runs[(0.0, 0)]["peers"][0]["test_accuracy"] != runs[(0.0, 1)]["peers"][0]["test_accuracy"]  # seeds act
    diffs = [runs[(0.5, s)]["mean_pairwise_kl"] - runs[(0.0, s)]["mean_pairwise_kl"] for s in (0, 1)]
    assert arm["metrics"]["pairwise KL"]["delta"]["mean"] == pytest.approx(sum(diffs) / 2)

    # MLflow: the sweep run holds the report and its figures; one run per trial under it
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    sweep_run = client.search_runs([experiment.experiment_id], "attributes.run_name = 'sweep-exp'")[0]
    assert {f.path for f in client.list_artifacts(sweep_run.info.run_id, "report")} == {
        "report/report.md",
        "report/report.json",
        "report/report.png",
    }
    assert sweep_run.data.metrics["alpha_0.5.pairwise KL.delta"] == pytest.approx(sum(diffs) / 2)
    assert sweep_run.data.params["experiment.baseline"] == "alpha=0"
    assert sweep_run.data.metrics["longer_x2.compute.peer_steps"] == 120

    # --resume of a finished experiment trains nothing and reports the same numbers
    assert main([*argv, "--resume"]) == 0
    again = json.loads((folder / "report.json").read_text())
    assert again["arms"] == report["arms"]
    assert len(list(folder.glob("*/run/summary.json"))) == 6
    # ... and logs nothing again: every metric of the sweep's run (the best trial's, the report's) and of the
    # trials' runs holds one value per step
    for run in client.search_runs([experiment.experiment_id]):
        for key in (k for k in run.data.metrics if not k.startswith("system/")):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
