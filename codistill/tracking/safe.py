"""MLflow calls that never stop training.

Every call to the tracking store goes through `SafeClient.call`: when MLflow raises (store
unreachable, database locked, disk full), the error becomes one warning line (once per kind of
error), the call is queued, and `retry()` at the end of the run replays the queue in order.
`summary.json` in the run directory stays the record either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["SafeClient"]


class SafeClient:
    def __init__(self, client: Any, uri: str, warn: Callable[[str], None]):
        self.client = client
        self.uri = uri
        self.warn = warn
        self.pending: list[tuple[str, tuple, dict]] = []
        self._warned: set[str] = set()
        self._last_try = 0.0

    RETRY_EVERY_S = 10.0

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call `client.method(...)`; on failure warn, queue it and return None. While calls are queued a
        new one waits its turn (metrics keep their order); the queue is tried again every RETRY_EVERY_S."""
        if self.pending and (time.monotonic() - self._last_try < self.RETRY_EVERY_S or not self.retry()):
            self.pending.append((method, args, kwargs))
            return None
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as e:
            self._last_try = time.monotonic()
            self._failed(method, e)
            self.pending.append((method, args, kwargs))
            return None

    def _failed(self, method: str, e: Exception) -> None:
        kind = type(e).__name__
        if kind not in self._warned:
            self._warned.add(kind)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else kind
            self.warn(
                f"warning: MLflow ({self.uri}) failed in {method}: {kind}: {first}; training goes on, "
                f"what was not logged is retried at the end (summary.json has everything)"
            )

    def retry(self) -> bool:
        """Replay the queued calls in order; True when none is left."""
        self._last_try = time.monotonic()
        queue, self.pending = self.pending, []
        for i, (method, args, kwargs) in enumerate(queue):
            try:
                getattr(self.client, method)(*args, **kwargs)
            except Exception as e:
                self._failed(method, e)
                self.pending = queue[i:]
                return False
        return True
