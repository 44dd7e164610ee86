"""A peer's loss ledger: the losses of its steps, kept on the device until something reads the peer anyway.

GPU steps never wait for the host: each step records a (3 + extras,) tensor [total, ce, distill, *extras] and
moves on; `check` reads every unread step at once wherever the peer's state leaves the device (evaluation,
weights published or saved) and stops at a non-finite loss, so a model trained past a NaN never gets out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from codistill.errors import CodistillError

__all__ = ["LossLedger", "NonFiniteLossError", "StepLoss"]


class NonFiniteLossError(CodistillError, RuntimeError):
    """A peer's loss became NaN or inf: nothing trained from that step on is saved, published or evaluated."""


@dataclass(frozen=True)
class StepLoss:
    step: int
    loss: float
    ce: float
    distill: float | None
    terms: dict[str, float] | None = None  # each loss term's value and the influence weights' statistics (NaN: none)


class LossLedger:
    """The per-step losses of one peer (of this rank, for a data-parallel peer)."""

    def __init__(self, peer_name: str, extra_names: Sequence[str], world_size: int, device: torch.device):
        self.peer_name = peer_name
        self.extra_names = tuple(extra_names)  # per-step values besides total, ce, distill
        self.world_size = world_size
        self.device = device
        self.clear()

    def clear(self) -> None:
        """Forget every step (a resumed peer starts a fresh ledger)."""
        # per step (step, (3,) [total, ce, distill] tensor, has_distill), then floats in read_losses.
        self.device_losses: list[tuple[int, torch.Tensor, bool]] = []
        self.read_losses: list[StepLoss] = []
        self._checked = 0  # how many of device_losses check has read
        self._non_finite: str | None = None  # once set, every read raises it: the weights past it are not kept

    def record(self, step: int, values: torch.Tensor, has_distill: bool) -> None:
        """A step's (3 + extras,) losses, left on the device."""
        self.device_losses.append((step, values, has_distill))

    def check(self) -> None:
        """Read this process's losses of the steps since the last read from the device, at once, and stop at a
        non-finite one. No collective: rank 0 of a data-parallel peer calls it alone before publishing.

        Called wherever the peer's state leaves the device anyway (evaluation, weights published or saved), so a
        model trained past a NaN is never evaluated, published or written, yet no step waits for the host."""
        if self._non_finite is not None:
            raise NonFiniteLossError(self._non_finite)
        unread = self.device_losses[self._checked :]
        if not unread:
            return
        rows = torch.stack([t for _, t, _ in unread]).tolist()  # (S, 3 + extras): the one device-to-host read
        self._checked = len(self.device_losses)
        self.read_losses.extend(self._step_losses(unread, rows))

    def take(self) -> list[StepLoss]:
        """The losses of the steps since the last call, oldest first (raises NonFiniteLossError on a NaN or inf).
        A data-parallel peer's are the means over its ranks (equal parts of the batch): every rank calls this."""
        if self.world_size == 1:
            self.check()
            out = self.read_losses
        else:
            import torch.distributed as dist

            if self._non_finite is not None:
                raise NonFiniteLossError(self._non_finite)
            stacked = torch.stack([t for _, t, _ in self.device_losses]) if self.device_losses else None
            stacked = stacked if stacked is not None else torch.zeros(0, 3 + len(self.extra_names), device=self.device)
            dist.all_reduce(stacked)  # every rank holds the same steps: their losses are summed in one call
            out = self._step_losses(self.device_losses, (stacked / self.world_size).tolist())
        self.device_losses, self.read_losses, self._checked = [], [], 0
        return out

    def _step_losses(self, steps: list[tuple[int, torch.Tensor, bool]], rows: list[list[float]]) -> list[StepLoss]:
        out = []
        for (step, _, has_distill), (total, ce, distill, *extras) in zip(steps, rows):
            if not math.isfinite(total):
                shown = distill if has_distill else None
                self._non_finite = (
                    f"peer {self.peer_name}: non-finite loss {total} at step {step} (ce={ce}, distill={shown}); "
                    f"nothing trained from it on is kept. Lower optim.lr or loss.temperature, or check the data."
                )
                raise NonFiniteLossError(self._non_finite)
            terms = dict(zip(self.extra_names, extras)) if self.extra_names else None
            out.append(StepLoss(step, total, ce, distill if has_distill else None, terms))
        return out
