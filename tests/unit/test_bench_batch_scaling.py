"""bench/batch_scaling.py (Anil et al.'s batch-size claim on one machine): its arithmetic, and its whole path in
seconds (`--quick`): every run trains, the JSON and the plot are written."""

import importlib.util
import json
import math

import pytest

from tests.helpers import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("batch_scaling", ROOT / "bench" / "batch_scaling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_to_a_target_are_read_linearly_between_evaluations():
    bench = _bench()
    points = [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert bench.steps_to(points, 2.5) == pytest.approx(15.0)
    assert bench.steps_to(points, 1.5) == 30 and bench.steps_to(points, 3.5) == 10
    assert bench.steps_to(points, 1.0) is None


def test_the_critical_batch_is_where_a_doubling_stops_cutting_the_steps_by_half():
    bench = _bench()
    speedups, critical = bench.critical_batch({8: 400.0, 16: 200.0, 32: 150.0, 64: 140.0})
    assert speedups == {"8->16": 2.0, "16->32": pytest.approx(4 / 3), "32->64": pytest.approx(150 / 140)}
    assert critical == 16
    assert bench.critical_batch({8: 400.0, 16: 210.0})[1] is None
    assert bench.critical_batch({8: None, 16: 210.0}) == ({"8->16": None}, None)


def test_quick_run_trains_every_arm_and_writes_json_and_plot(tmp_path):
    out = tmp_path / "batch_scaling.json"
    result = _bench().main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["by_target"] == json.loads(json.dumps(result["by_target"]))
    labels = [r["label"] for r in saved["runs"]]
    singles = [f"1 model, batch {b}" for b in (2, 4, 8, 16)]
    assert labels == [*singles, "2 co-distilling, batch 4 each"]
    pair = saved["runs"][-1]
    assert (
        pair["examples_per_step"] == 8
        and pair["curve"][-1][0] == 40
        and all(math.isfinite(v) for _, v in pair["curve"])
    )
    # the loosest target is reached by every run (it is chosen so)
    assert all(r["steps_to_target"][-1] is not None for r in saved["runs"])
    assert out.with_suffix(".png").stat().st_size > 10_000
