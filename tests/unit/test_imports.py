"""Each public module imports in a fresh process (no cycles); the core stays free of ray and mlflow,
and the config (what the CLI checks before anything starts) free of torch too."""

import subprocess
import sys

import pytest

CORE = [
    "codistill.config",
    "codistill.losses",
    "codistill.models",
    "codistill.data",
    "codistill.metrics",
    "codistill.peer",
    "codistill.exchange",
    "codistill.storage",
]
LIGHT = ["codistill", "codistill.config", "codistill.errors", "codistill.registry"]
# what the board actor's process imports: it holds and unpickles numpy shards, and torch would cost it
# 2 s and 600 MB at every start and restart
TORCH_FREE = [
    "codistill.exchange",
    "codistill.exchange.board",
    "codistill.exchange.wire",
    "codistill.exchange.ray_board",
]
# The front doors and what a peer actor's process imports, alone. Cycles among all of codistill's modules are
# found without starting a process (test_import_layers); each heavy module here costs ~4 s of CPU in CI.
ALL = sorted({*CORE, *LIGHT, *TORCH_FREE, "codistill.engine.peer_actor", "codistill.run", "codistill.tune"})


@pytest.fixture(scope="module")
def imports_alone():
    """A fresh interpreter per module, all started at once (each spends ~2 s importing; one after another
    they were 40 s of the suite): {module: its process}."""
    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(','.join(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"
    )
    procs = {
        m: subprocess.Popen([sys.executable, "-c", code, m], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for m in ALL
    }
    yield procs
    for p in procs.values():
        p.kill()
        p.communicate()


@pytest.mark.parametrize("module", ALL)
def test_module_imports_alone(module, imports_alone):
    out, err = imports_alone[module].communicate(timeout=300)
    assert imports_alone[module].returncode == 0, err
    loaded = set(filter(None, out.strip().split(",")))
    if module in CORE:
        assert not loaded & {"ray", "mlflow"}, f"{module} pulled in {loaded}"
    if module in LIGHT:
        assert not loaded, f"{module} pulled in {loaded}"
    if module in TORCH_FREE:
        assert "torch" not in loaded, f"{module} pulled in {loaded}"


def test_public_api():
    code = (
        "import codistill; "
        "names = [codistill.RunConfig, codistill.load_job, codistill.train, codistill.LocalEngine, "
        "codistill.RayEngine, codistill.__version__]; print(codistill.__version__)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from importlib.metadata import version

    assert r.stdout.strip() == version("codistill")


def test_extras_install_in_a_process_that_has_not_imported_their_registry():
    """What the board actor is: a fresh process that gets the driver's registered models before it has
    imported `codistill.models`; a job that names them must validate there."""
    driver = (
        "import pickle, sys, torch.nn as nn; from codistill.models import MODELS; from codistill.registry import "
        "all_extras; MODELS['tiny_extra'] = nn.Identity; sys.stdout.buffer.write(pickle.dumps(all_extras()))"
    )
    shipped = subprocess.run([sys.executable, "-c", driver], capture_output=True, check=True).stdout
    actor = (
        "import pickle, sys; from codistill.registry import install_extras; from codistill.config import build; "
        "install_extras(pickle.loads(sys.stdin.buffer.read())); "
        "cfg = build({'peers': [{'model': 'mlp'}, {'model': 'tiny_extra'}]}); print(cfg.peers[1].model)"
    )
    r = subprocess.run([sys.executable, "-c", actor], input=shipped, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == "tiny_extra"
