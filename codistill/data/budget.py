"""How many bytes a job's data may take once decoded, checked before anything is allocated.

A few kilobytes of Parquet can declare gigabytes of pixels (PNG compresses a blank image about a
thousand times, and Parquet stores a repeated value once), so a loader asks the budget for an
array's size before it allocates it. The budget is `data.max_decoded_bytes`, else half of the
memory this machine has available when the job starts. No ray, no mlflow.
"""

from __future__ import annotations

import os

from codistill.errors import ConfigError

__all__ = ["DecodeBudget", "available_memory", "gib"]


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def gib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n:,} bytes"


class DecodeBudget:
    """`take(nbytes, ...)` before allocating `nbytes`; refused in one line naming what and where."""

    def __init__(self, max_bytes: int | None):
        self.limit = max_bytes if max_bytes is not None else available_memory() // 2
        self.source = "data.max_decoded_bytes" if max_bytes is not None else "half the memory available"
        self.used = 0

    def take(self, nbytes: int, field: str, what: str) -> None:
        if self.used + nbytes > self.limit:
            left = self.limit - self.used
            raise ConfigError(
                field,
                message=f"{what} decode to {gib(nbytes)}, more than the {gib(left)} left of the {gib(self.limit)} "
                f"allowed ({self.source}); use fewer rows (data.limit_train / limit_test), smaller images, or raise "
                "data.max_decoded_bytes",
            )
        self.used += nbytes
