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
ALL = sorted(
    {
        *CORE,
        *LIGHT,
        "codistill.engine",
        "codistill.engine.peer_actor",
        "codistill.exchange.ray_board",
        "codistill.api",
        "codistill.tracking",
        "codistill.tune",
        "codistill.run",
        "codistill.experiment",
    }
)


@pytest.mark.parametrize("module", ALL)
def test_module_imports_alone(module):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "print(','.join(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = set(filter(None, r.stdout.strip().split(",")))
    if module in CORE:
        assert not loaded & {"ray", "mlflow"}, f"{module} pulled in {loaded}"
    if module in LIGHT:
        assert not loaded, f"{module} pulled in {loaded}"


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
