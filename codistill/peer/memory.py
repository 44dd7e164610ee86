"""A process's peak memory, what the memory report gives per peer and rank: on a GPU the most the caching
allocator held for tensors on the peer's device (`torch.cuda.max_memory_allocated`), on a CPU the process's
peak resident set (`getrusage`: the high-water mark of everything it mapped, Python and libraries included)."""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["peak_memory"]


def peak_memory(device: torch.device) -> tuple[str, int]:
    """("cuda", bytes) or ("rss", bytes): the peak since the process started."""
    if device.type == "cuda":
        return "cuda", int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "rss", int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
