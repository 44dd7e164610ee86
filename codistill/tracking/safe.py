"""MLflow calls that never stop training.

Every call to the tracking store goes through `SafeClient`, which owns the MLflow client and one worker
thread that makes the calls in the order they were queued: training only queues them. When MLflow
raises (store unreachable or silent, database locked, disk full), the error becomes one warning line
(said on the training thread, at its next call) and the call is tried again in the background, with a
growing pause, until the store answers; later calls wait their turn (metrics keep their order, and a
call that needs a run id runs after the call that creates the run). A call the store refuses (a 4xx
answer: it would fail again) is dropped. At the end of the run `drain` waits for the queue to empty,
giving up on a store that keeps failing. `summary.json` in the run directory stays the record either way.

HTTP stores: each call runs with MLFLOW_HTTP_REQUEST_TIMEOUT set to the tracker's per-call timeout
and MLFLOW_HTTP_REQUEST_MAX_RETRIES to 0 (MLflow would otherwise retry 7 times with exponential
backoff, 4 minutes, before it raises). MLflow reads them from os.environ at every request, and offers
no other way to set them: they are set while a call runs and the program's own values put back when
none does (a request another thread makes meanwhile sees them too).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["SafeClient", "is_transient", "http_limits"]


def is_transient(e: BaseException) -> bool:
    """Whether a call that raised `e` may succeed when tried again: False for what the store refused
    (an MlflowException with a 4xx status other than 408/429) and for errors in the call itself."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return not (400 <= status < 500) or status in (408, 429)
    return isinstance(e, OSError) or not isinstance(e, (TypeError, ValueError, AttributeError, LookupError))


_ENV_LOCK = threading.Lock()
_env_users = 0
_env_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def http_limits(timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP client reads its timeout and retries from the environment on every request: set
    them while a tracker's call runs and put the program's values back when no call runs (several
    trackers in one process share one setting: the first one's)."""
    global _env_users, _env_saved
    values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with _ENV_LOCK:
        if _env_users == 0:
            _env_saved = {k: os.environ.get(k) for k in values}
            os.environ.update(values)
        _env_users += 1
    try:
        yield
    finally:
        with _ENV_LOCK:
            _env_users -= 1
            if _env_users == 0:
                for k, v in _env_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


class SafeClient:
    """See module docstring. `make_client` builds the MLflow client, on the worker thread at the first
    call (a SQLite store creates its tables then: seconds, or an error)."""

    FIRST_RETRY_S = 0.5
    RETRY_EVERY_S = 10.0  # the longest pause between two tries of a store that keeps failing

    def __init__(
        self, make_client: Callable[[], Any], uri: str, warn: Callable[[str], None], *, request_timeout_s: int = 10
    ):
        self.uri = uri
        self.warn = warn
        self.request_timeout_s = request_timeout_s
        self._make_client = make_client
        self._client: Any = None
        self._queue: collections.deque[tuple[Callable[[], Any], str]] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False  # given up: nothing more runs
        self._failing = False  # the last try failed (the store has not answered since)
        self._last_done = time.monotonic()  # when a call last succeeded
        self._retry_now = False
        self._draining = False  # drain waits: a failed call is tried again soon, not after the longest pause
        self._failed_try_began: float | None = None  # when the try that failed last began
        self._notes: list[str] = []  # warnings from the worker, said on the caller's thread
        self._failure_note: str | None = None  # the first failure's warning, not said yet
        self._warned_failing = False
        self._warned_refused = False

    @property
    def client(self) -> Any:
        """The MLflow client (for calls made on the worker thread only)."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def submit(self, fn: Callable[[], Any], what: str) -> None:
        """Queue `fn()` (it runs on the worker thread, after every call queued before it); `what` names it
        in warnings."""
        self.say_notes()
        with self._cv:
            if self._closed:
                return
            self._queue.append((fn, what))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="codistill-mlflow", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Queue `client.method(*args, **kwargs)`."""
        self.submit(lambda: getattr(self.client, method)(*args, **kwargs), method)

    def _work(self) -> None:
        try:
            self._work_on_queue()
        finally:  # died of what is not an Exception: drain must not wait for it
            with self._cv:
                if self._thread is threading.current_thread():
                    self._thread = None
                    self._cv.notify_all()

    def _work_on_queue(self) -> None:
        delay = self.FIRST_RETRY_S
        while True:
            with self._cv:
                if self._closed or not self._queue:
                    self._thread = None  # under the lock: a later submit starts a new worker
                    self._cv.notify_all()
                    return
                item = self._queue[0]
            fn, what = item
            began = time.monotonic()
            try:
                with http_limits(self.request_timeout_s):
                    fn()
            except Exception as e:
                transient = is_transient(e)
                with self._cv:
                    if transient:
                        self._failing, self._failed_try_began = True, began
                        self._note_failure(what, e, "failing")
                    else:
                        self._pop(item)
                        self._note_failure(what, e, "refused")
                    self._cv.notify_all()
                    if transient:  # pause, then try the same call again (drain and close wake it up)
                        deadline = time.monotonic() + (self.FIRST_RETRY_S if self._draining else delay)
                        while not (self._closed or self._retry_now) and time.monotonic() < deadline:
                            self._cv.wait(deadline - time.monotonic())
                        self._retry_now = False
                        delay = min(delay * 2, self.RETRY_EVERY_S)
                continue
            with self._cv:
                self._pop(item)
                self._failing = False
                self._last_done = time.monotonic()
                self._cv.notify_all()
            delay = self.FIRST_RETRY_S

    def _pop(self, item: tuple[Callable[[], Any], str]) -> None:
        if self._queue and self._queue[0] is item:  # else `close` emptied the queue while it ran
            self._queue.popleft()

    def _note_failure(self, what: str, e: Exception, how: str) -> None:
        """One warning line for the first failure, one for the first refusal (called holding the lock)."""
        kind = type(e).__name__
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else kind
        if how == "failing" and not self._warned_failing:
            self._warned_failing = True
            self._failure_note = (
                f"warning: MLflow ({self.uri}) failed in {what}: {kind}: {first}; training goes on, what was not "
                f"logged is retried in the background (summary.json has everything)"
            )
        elif how == "refused" and not self._warned_refused:
            self._warned_refused = True
            self._notes.append(
                f"warning: MLflow ({self.uri}) refused {what}: {kind}: {first}; it is not logged (summary.json has "
                f"everything)"
            )

    def note(self, message: str) -> None:
        """A warning from a call on the worker thread, said on the training thread's next call."""
        with self._cv:
            self._notes.append(message)

    def say_notes(self) -> None:
        """Say the worker's warnings (on the caller's thread: the console is not the worker's)."""
        with self._cv:
            notes = [self._failure_note] if self._failure_note else []
            notes += self._notes
            self._failure_note, self._notes = None, []
        for note in notes:
            self.warn(note)

    def warn_failing(self, message: str) -> None:
        """Say `message` instead of the first failure's warning: one line for the store failing, in all."""
        with self._cv:
            say = not self._warned_failing or self._failure_note is not None
            self._warned_failing, self._failure_note = True, None
        if say:
            self.warn(message)
        self.say_notes()

    def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait up to `timeout_s` for `done()` (checked whenever a call ends); its last value."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not done() and time.monotonic() < deadline:
                self._cv.wait(min(0.5, deadline - time.monotonic()))
            return done()

    def drain(self, patience_s: float) -> bool:
        """Wait for every queued call to be made; give up once the store has failed for `patience_s`
        with no call succeeding (a store that answers, however slowly, is waited for). True if none is
        left. Only a try begun while draining counts as failing: a call that began while the store was
        down and failed late (a SQLite lock held for minutes, released at the end) is tried again."""
        with self._cv:
            start = time.monotonic()
            self._retry_now = True  # a worker pausing after a failure tries again now
            self._draining = True
            self._cv.notify_all()
            while self._queue and not self._closed:
                if self._thread is None:  # the worker died (of what is not an Exception): nothing will run
                    break
                failed_now = self._failing and (self._failed_try_began or 0.0) >= start
                if failed_now and time.monotonic() - max(start, self._last_done) >= patience_s:
                    break
                self._cv.wait(0.2)
            self._draining = False
            left = not self._queue
        self.say_notes()
        return left

    def close(self) -> int:
        """Give up: what is queued is not made (a call in flight still ends, bounded by its timeout).
        Returns how many calls were not made."""
        with self._cv:
            self._closed = True
            left = len(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        self.say_notes()
        return left
