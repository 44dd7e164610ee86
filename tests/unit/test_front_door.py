"""One way to change a job (config/overrides.py) and one plan of a run (run_plan.prepare_run), from both front
doors: `python -m codistill.run` and `codistill.train`."""

import json
from typing import Any

import pytest
import yaml

import codistill
from codistill.config import build
from codistill.config.overrides import apply, dotted, parse_set
from codistill.config.parse import read_yaml
from codistill.config.schema import run_config_validations
from codistill.errors import ConfigError
from codistill.run import main
from codistill.run_plan import prepare_run

FAST: dict[str, Any] = {"engine": "local", "tracking": "none", "eval_every": 3, "data": {"batch_size": 32}}


def epochs_job(tmp_path, epochs=2.0):
    """The quickstart counting epochs, as jobs/cifar10_codistill_dp.yaml does."""
    raw = read_yaml(codistill.config.job_path("quickstart"))
    raw.pop("steps")
    raw["epochs"] = epochs
    path = tmp_path / "epochs.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_setting_one_of_an_exclusive_pair_clears_the_other():
    assert apply({"epochs": 60}, {"steps": 40}) == {"steps": 40}
    assert apply({"steps": 40}, [("epochs", 2)]) == {"epochs": 2}
    assert build(apply({"epochs": 60}, parse_set(["steps=40"]))).steps == 40
    assert apply({"steps": 40}, {"steps": None}) == {"steps": None}  # unsetting clears nothing
    with pytest.raises(ConfigError, match="exactly one of `steps` or `epochs`"):  # both asked for at once
        build(apply({}, parse_set(["steps=40", "epochs=2"])))


def test_nested_overrides_merge_into_their_section():
    raw: dict[str, Any] = {"loss": {"alpha": 0.5, "temperature": 3.0}, "tracking": "none"}
    out = apply(raw, dotted({"loss": {"alpha": 0}, "tracking": {"backend": "mlflow"}, "data": {}}))
    assert out == {"loss": {"alpha": 0, "temperature": 3.0}, "tracking": {"backend": "mlflow"}}
    assert raw["loss"]["alpha"] == 0.5  # a copy


def test_cli_steps_override_on_a_job_that_counts_epochs(tmp_path, capsys):
    job = epochs_job(tmp_path)
    sets = ["engine=local", "tracking=none", "steps=6", "eval_every=3", "data.batch_size=32"]
    argv = ["--config", str(job), *[a for s in sets for a in ("--set", s)], "--output", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [p["steps"] for p in summary["peers"]] == [6, 6]
    assert summary["config"]["epochs"] is None


def test_cli_epochs_override_on_a_job_that_counts_steps(tmp_path):
    plan = prepare_run("quickstart", parse_set(["epochs=0.5"]))
    assert (plan.config.steps, plan.config.epochs) == (None, 0.5)


def test_python_api_steps_override_on_a_job_that_counts_epochs(tmp_path):
    result = codistill.train(epochs_job(tmp_path), steps=6, output={"dir": str(tmp_path / "run")}, **FAST)
    assert [p["steps"] for p in result.summary["peers"]] == [6, 6]
    assert result.run_dir == str(tmp_path / "run")


def test_a_run_validates_its_job_once(tmp_path):
    before = run_config_validations()
    codistill.train("quickstart", steps=3, output={"dir": str(tmp_path / "run")}, **FAST)
    assert run_config_validations() - before == 1


def test_a_resume_is_planned_from_the_run_directory(tmp_path):
    codistill.train("quickstart", steps=3, output={"dir": str(tmp_path / "run")}, **FAST)
    with pytest.raises(codistill.api.RunFinishedError, match="finished already"):
        prepare_run(str(tmp_path / "run"), parse_set(["steps=6"]), resume=True)
    with pytest.raises(ConfigError, match="--resume"):
        prepare_run(str(tmp_path / "nothing"), resume=True)
