"""What a training step does not do: touch torch's generator for a model that draws no random numbers,
queue CUDA seedings with formatted stacks, or normalise data that is stored normalised already."""

import pytest
import torch
import torch.nn as nn
import torchvision

from codistill.data import load_dataset
from codistill.models import build_model
from codistill.models.randomness import draws_random_numbers
from codistill.peer import Peer
from codistill.peer.batches import PeerData
from tests.helpers import make_peer, small_job


class Noisy(nn.Module):  # a user's model: its forward could draw anything
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x + 0.1 * torch.randn_like(x))


@pytest.mark.parametrize(
    ("model", "random"),
    [
        (build_model("mlp", (1, 8, 8), 10), True),  # dropout 0.1
        (build_model("mlp", (1, 8, 8), 10, {"dropout": 0.0}), False),
        (build_model("cnn", (3, 32, 32), 10), False),
        (build_model("resnet20", (3, 32, 32), 10), False),
        (build_model("gpt", (16,), 64, {"n_layer": 1, "n_head": 2, "n_embd": 16}), False),
        (build_model("gpt", (16,), 64, {"n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1}), True),
        (Noisy(), True),
        (torchvision.models.resnet18(num_classes=10), True),  # not ours to vouch for
        (nn.Sequential(nn.Linear(4, 4), nn.RReLU()), True),
    ],
    ids=["mlp", "mlp-p0", "cnn", "resnet20", "gpt", "gpt-dropout", "user", "torchvision", "rrelu"],
)
def test_which_models_draw_random_numbers(model, random):
    assert draws_random_numbers(model) is random


def _steps(peer: Peer, n: int) -> None:
    for _ in range(n):
        peer.forward()
        peer.train_step(None)


def _generator_states_in_forward(peer: Peer) -> list[torch.Tensor]:
    """torch's global generator state at the start of each forward pass of the peer's model."""
    seen: list[torch.Tensor] = []
    peer.module.register_forward_pre_hook(lambda module, args: seen.append(torch.get_rng_state()))
    return seen


def test_a_deterministic_model_trains_without_touching_the_global_generator():
    cfg = small_job(models=("cnn", "cnn"))
    peer = make_peer(cfg, 0, load_dataset(cfg.data))
    seen = _generator_states_in_forward(peer)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _steps(peer, 3)
    # not reseeded for the forward (a fork would restore the state afterwards, but seed it inside)
    assert len(seen) == 3 and all(torch.equal(state, before) for state in seen)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(
    torch.cuda.is_initialized() or not hasattr(torch.cuda, "_lazy_seed_tracker"),
    reason="the lazy CUDA seed queue exists only before CUDA starts",
)
def test_dropout_steps_seed_the_cpu_generator_only_and_restore_it():
    """torch.manual_seed would queue a CUDA seeding with the caller's formatted stack on every step."""
    cfg = small_job(models=("mlp", "mlp"))
    peer = make_peer(cfg, 0, load_dataset(cfg.data))
    tracker = torch.cuda._lazy_seed_tracker
    tracker.manual_seed_cb = tracker.manual_seed_all_cb = None  # what was queued before is not this test's
    tracker.call_order = []
    seen = _generator_states_in_forward(peer)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    _steps(peer, 3)
    assert not any(torch.equal(state, before) for state in seen)  # each forward drew from (seed, step)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's draws were forked off
    queued = ["".join(call[1]) for call in tracker.get_calls() if call is not None]
    assert queued and not any("codistill/peer/peer.py" in stack for stack in queued), queued
    # and the draws are the peer's own: the same step again gives the same loss
    again = make_peer(cfg, 0, load_dataset(cfg.data))
    _steps(again, 3)
    assert [s.loss for s in peer.take_losses()] == [s.loss for s in again.take_losses()]


def test_data_stored_normalised_is_not_normalised_again():
    cfg = small_job()
    ds = load_dataset(cfg.data)  # synthetic: float, mean 0, std 1, scale 1
    data = PeerData(ds, cfg.data, order_seed=0, aug_seed=0)
    x = data.train_x[:4]
    assert data.normalize(x) is x
    digits = load_dataset(small_job("data.name=digits").data)  # uint8-range values: scaled and standardised
    raw = digits.train_x[:4]
    out = PeerData(digits, cfg.data, order_seed=0, aug_seed=0).normalize(raw)
    assert out is not raw and abs(float(out.mean())) < 1.5
