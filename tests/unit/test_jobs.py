"""Every job file loads and validates; the small ones run; cluster.yaml passes Ray's own schema."""

import pytest
import yaml

from codistill import config as C
from codistill.sweeps.settings import load_sweep
from tests.helpers import ROOT

JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_the_issue_job_files_exist():
    assert {
        "quickstart.yaml",
        "digits_dml.yaml",
        "cifar100_dml_resnet32.yaml",
        "cifar10_codistill.yaml",
        "tune_temperature.yaml",
    } <= {p.name for p in JOBS}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_files_validate(path):
    raw = C.read_yaml(path)
    if "search" in raw:
        base, search, settings = load_sweep(str(path), [])
        assert search and settings.num_samples >= 1
        cfg = C.build(base)
    else:
        cfg = C.build(raw)
    assert cfg.name == path.stem


def test_dml_paper_job_matches_the_paper():
    cfg = C.load_job(ROOT / "jobs" / "cifar100_dml_resnet32.yaml")
    assert [p.model for p in cfg.peers] == ["resnet32", "resnet32"] and cfg.data.name == "cifar100"
    o = cfg.peer_optim(0)
    assert (o.momentum, o.nesterov, o.schedule, o.gamma, cfg.data.batch_size, cfg.epochs) == (
        0.9,
        True,
        "step",
        0.1,
        64,
        200,
    )
    assert [round(m * 200) for m in o.milestones] == [60, 120, 180]
    anil = C.load_job(ROOT / "jobs" / "cifar10_codistill.yaml")
    assert anil.exchange.mode == "checkpoint" and anil.data.shard == "disjoint" and anil.loss.burn_in > 0


def test_cluster_yaml_passes_the_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    assert any("pip install" in c and "codistill" in c for c in cluster["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in cluster["head_start_ray_commands"])
    broken = dict(cluster, max_wrkers=3)  # the schema rejects what it does not know: the check has teeth
    with pytest.raises(Exception, match="max_wrkers"):
        validate_config(prepare_config(broken))
