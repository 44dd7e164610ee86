import subprocess
import sys

import pytest
import yaml

from codistill import config as C
from tests.helpers import ROOT


def raw_quickstart():
    return C.read_yaml(ROOT / "jobs" / "quickstart.yaml")


def test_quickstart_loads_and_is_frozen():
    cfg = C.load_job()
    assert cfg.name == "quickstart" and cfg.num_peers == 2
    assert cfg.peers[0].model != cfg.peers[1].model
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]  # frozen


def test_overrides_coerce_types_and_reach_one_peer():
    cfg = C.build(
        C.apply_overrides(
            raw_quickstart(),
            [
                "loss.alpha=0",
                "loss.temperature=2",
                "peers.1.model=resnet20",
                "peers.0.optim.lr=3e-3",
                "exchange.mode=checkpoint",
                "data.augment=true",
                "optim.milestones=[0.3, 0.6]",
                "loss.zscore=yes",
            ],
        )
    )
    assert cfg.loss.alpha == 0.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.loss.temperature == 2.0
    assert cfg.peers[1].model == "resnet20"
    assert cfg.peer_optim(0).lr == pytest.approx(3e-3)
    assert cfg.peer_optim(1).lr == pytest.approx(0.05)  # job-level optim still applies to the other peer
    assert cfg.peer_optim(1).milestones == (0.3, 0.6)
    assert cfg.exchange.mode == "checkpoint" and cfg.data.augment is True and cfg.loss.zscore is True


def test_job_optim_merged_into_peer_optim():
    cfg = C.build(
        {"steps": 10, "optim": {"lr": 0.2, "momentum": 0.5}, "peers": [{"model": "mlp", "optim": {"lr": 0.01}}, "cnn"]}
    )
    assert cfg.peer_optim(0).lr == 0.01 and cfg.peer_optim(0).momentum == 0.5
    assert cfg.peers[1].model == "cnn" and cfg.peer_optim(1).lr == 0.2


@pytest.mark.parametrize(
    "override, field, fragment",
    [
        ("loss.temprature=2", "loss.temprature", "unknown key"),
        ("loss.temperature=-1", "loss.temperature", "> 0"),
        ("loss.temperature=hot", "loss.temperature", "a number"),
        ("loss.alpha=1.5", "loss.alpha", "[0, 1]"),
        ("loss.divergence=kld", "loss.divergence", "reverse_kl"),
        ("exchange.mode=gossip", "exchange.mode", "'logits' | 'checkpoint'"),
        ("steps=ten", "steps", "an integer"),
        ("peers.5.model=cnn", "peers.5", "0..1"),
        ("data.batch_size=0", "data.batch_size", ">= 1"),
        ("resources.num_gpus=1.5", "resources.num_gpus", "fraction"),
        ("exchange.staleness=-2", "exchange.staleness", ">= 0"),
        ("exchange.inline_max_bytes=-1", "exchange.inline_max_bytes", "[0, 1048576]"),
    ],
)
def test_bad_values_name_field_value_and_allowed(override, field, fragment):
    with pytest.raises(ValueError) as e:
        C.build(C.apply_overrides(raw_quickstart(), [override]))
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert fragment in msg, msg


def test_disjoint_shards_need_checkpoint_mode():
    with pytest.raises(ValueError, match="data.shard"):
        C.build(C.apply_overrides(raw_quickstart(), ["data.shard=disjoint"]))
    cfg = C.build(C.apply_overrides(raw_quickstart(), ["data.shard=disjoint", "exchange.mode=checkpoint"]))
    assert cfg.data.shard == "disjoint"


def test_tracking_shorthand_and_steps_or_epochs():
    assert C.build({"steps": 3, "tracking": "none"}).tracking.backend == "none"
    with pytest.raises(ValueError, match="^tracking.backend"):
        C.build({"steps": 3, "tracking": "wandb"})
    with pytest.raises(ValueError, match="exactly one"):
        C.build({"steps": 3, "epochs": 2})
    assert C.build({"epochs": 2}).epochs == 2.0


def test_roundtrip_to_dict_and_flatten():
    cfg = C.load_job()
    again = C.build(yaml.safe_load(yaml.safe_dump(C.to_dict(cfg))))
    assert again == cfg
    flat = C.flatten(C.to_dict(cfg))
    assert flat["loss.alpha"] == cfg.loss.alpha and flat["peers.1.model"] == cfg.peers[1].model


def test_cli_bad_set_exits_nonzero_with_one_line(tmp_path):
    for bad, field in (
        ("loss.nope=1", "loss.nope"),
        ("loss.temperature=-3", "loss.temperature"),
        ("steps=abc", "steps"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "codistill.run", "--set", bad, "--output", str(tmp_path / "x")],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2
        lines = [line for line in r.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), r.stderr
        assert not (tmp_path / "x").exists()  # nothing started
