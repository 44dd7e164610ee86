"""What a peer's extra forward passes run inside so that they change nothing they should not: torch's
generators seeded for one pass and restored after it, and BatchNorm's running statistics left as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

__all__ = ["norm_stats_kept", "seeded_generators"]


@contextlib.contextmanager
def seeded_generators(seed: int, device: torch.device) -> Iterator[None]:
    """Inside, the generators a forward pass on `device` draws from start at `seed`; outside, they are as before."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        # The generators the forward uses, seeded directly: torch.manual_seed also seeds every CUDA device,
        # and in a process that has not initialised CUDA it defers that with the caller's formatted stack
        # (traceback.format_stack) on every call: 0.08 ms from a shallow stack, more from a deep one, per step.
        torch.default_generator.manual_seed(seed)
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def norm_stats_kept(model: nn.Module) -> Iterator[None]:
    """Train-mode forward passes inside leave BatchNorm's running statistics as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)
