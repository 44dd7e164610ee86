"""Streamed images decoded by Ray Data (`data.loader: ray_data`): a peer's windows (codistill.data.streamed) run as
Ray Data tasks on any node's free CPUs, several at once, and come back to the peer's process in order.

Why each rank runs its own small Ray Data pipeline instead of one `streaming_split` of a shared dataset:
`streaming_split` hands out blocks in the order they finish and makes its consumers start each epoch together,
so a rank's batches would depend on timing, a slow or restarted peer would hold the others up at every epoch, and
no run could resume where it stopped. Here a rank's windows, and their order, are a pure function of the seed and
the epoch; Ray Data only decodes them (`preserve_order`), ahead of the step that needs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from codistill.data.streamed import decode_window

__all__ = ["RayDataDecoder"]


def _decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    (window,) = batch["window"].tolist()  # batch_size=1: one window per call
    return decode_window(json.loads(window))


@dataclass(frozen=True)
class RayDataDecoder:
    """A `WindowDecoder` (codistill.data.streamed) that travels in a PeerStart and runs in the peer's process."""

    decode_cpus: float = 1.0
    prefetch_windows: int = 2  # decoded windows waiting beside the one being read

    def __call__(self, windows: list[dict]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        if not windows:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # windows come back in stream order, whoever decoded them
        ctx.enable_progress_bars = False  # the peer's own lines say how training goes
        items = ray.data.from_items([{"window": json.dumps(w)} for w in windows], override_num_blocks=len(windows))
        ds = items.map_batches(_decode, batch_size=1, num_cpus=self.decode_cpus, zero_copy_batch=True)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch_windows)
