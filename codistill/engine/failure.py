"""What the driver does when a peer fails: a typed failure in, a decision out (as Ray Train v2's
FailurePolicy), acted on in one place of the collect loop."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from codistill.config import RunConfig
from codistill.errors import CodistillError

__all__ = ["Decision", "FailureKind", "FailurePolicy", "PeerFailedError", "PeerFailure"]

FailureKind = Literal["restarted", "died", "step_failed", "start_failed"]
"""restarted: Ray restarted the actor (`detail`: how it went on, from which checkpoint or from step 0); died: it
is dead for good (restarts used up); step_failed: a step raised (non-finite loss, a teacher that never came within
exchange.timeout_s, ...); start_failed: the peer could not be built (it is not restarted: it would fail the
same way)."""


class Decision(enum.Enum):
    CONTINUE = "continue"  # the run goes on; the event is shown and recorded
    RAISE = "raise"  # the run stops with the failure's message


@dataclass(frozen=True)
class PeerFailure:
    """Something that happened to a peer actor, as the driver saw it."""

    peer: str
    round: int
    kind: FailureKind
    detail: str
    restarts: int = 0


class PeerFailedError(CodistillError, RuntimeError):
    """A peer could not go on, so the run stopped (the message names the peer, round and cause)."""

    def __init__(self, message: str, *, peer: str, round: int, kind: FailureKind):
        super().__init__(message)
        self.peer = peer
        self.round = round
        self.kind = kind


class FailurePolicy:
    """What the *run* does about a PeerFailure (Ray restarts actors itself, up to
    `resources.max_restarts`)."""

    def __init__(self, cfg: RunConfig):
        self.max_restarts = cfg.resources.max_restarts

    def decide(self, failure: PeerFailure) -> tuple[Decision, str]:
        if failure.kind == "restarted":
            how = f" and {failure.detail}" if failure.detail else ""  # "resumed from ... at step K" / "started over"
            return Decision.CONTINUE, f"{failure.peer} restarted ({failure.restarts} restart(s) so far){how}"
        if failure.kind == "start_failed":
            return Decision.RAISE, f"peer {failure.peer} could not start: {failure.detail}"
        if failure.kind == "died":
            return Decision.RAISE, (
                f"peer {failure.peer} died and could not be restarted "
                f"(resources.max_restarts={self.max_restarts}): {failure.detail}"
            )
        # A failed step is deterministic given the peer's checkpoint (a NaN comes back the same way):
        # retrying it would loop, so the run stops and says which peer and why.
        return Decision.RAISE, f"peer {failure.peer} failed in round {failure.round}: {failure.detail}"

    def error(self, failure: PeerFailure, message: str) -> PeerFailedError:
        return PeerFailedError(message, peer=failure.peer, round=failure.round, kind=failure.kind)
