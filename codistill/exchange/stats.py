"""What one peer's exchange did: bytes, observed staleness, time spent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ExchangeStats"]


@dataclass
class ExchangeStats:
    bytes_published: int = 0
    bytes_pulled: int = 0
    staleness_sum: float = 0.0
    staleness_count: int = 0
    staleness_max: int = 0
    teacher_lead_max: int = 0  # the most steps a teacher signal was ahead of the student
    exchange_s: float = 0.0  # wall time in publish + pull + wait
    teacher_forward_s: float = 0.0  # checkpoint mode: running the local teachers (compute, not exchange)
    teacher_updates: int = 0
    teacher_forwards: int = 0  # checkpoint mode: batches run through a local teacher (one per teacher and step)
    publishes: int = 0  # checkpoint mode: versions this peer published (bytes_published / publishes per version)

    def see_staleness(self, staleness: int) -> None:
        """`staleness` = student step - the teacher step that produced the signal. A free-running
        teacher can be ahead (negative): that signal is not stale, so it counts as 0 and the lead is kept
        apart; otherwise a mean over a fast and a slow peer would average a lag with a lead."""
        self.staleness_sum += max(staleness, 0)
        self.staleness_count += 1
        self.staleness_max = max(self.staleness_max, staleness)
        self.teacher_lead_max = max(self.teacher_lead_max, -staleness)

    def merge(self, other: ExchangeStats) -> None:
        for f in (
            "bytes_published",
            "bytes_pulled",
            "staleness_sum",
            "staleness_count",
            "exchange_s",
            "teacher_forward_s",
            "teacher_updates",
            "teacher_forwards",
            "publishes",
        ):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.staleness_max = max(self.staleness_max, other.staleness_max)
        self.teacher_lead_max = max(self.teacher_lead_max, other.teacher_lead_max)

    @property
    def bytes_per_publish(self) -> int:
        """Checkpoint mode: what one published version weighed (0 before the first)."""
        return self.bytes_published // self.publishes if self.publishes else 0

    def staleness(self) -> dict[str, float]:
        """The summary's `staleness` entry."""
        mean = self.staleness_sum / self.staleness_count if self.staleness_count else 0.0
        return {"mean": mean, "max": self.staleness_max, "teacher_lead_max": self.teacher_lead_max}

    def to_dict(self) -> dict[str, Any]:
        st = self.staleness()
        return {
            "bytes_published": self.bytes_published,
            "bytes_pulled": self.bytes_pulled,
            "staleness_mean": st["mean"],
            "staleness_max": st["max"],
            "teacher_lead_max": st["teacher_lead_max"],
            "exchange_s": self.exchange_s,
            "teacher_forward_s": self.teacher_forward_s,
            "teacher_updates": self.teacher_updates,
            "teacher_forwards": self.teacher_forwards,
            "publishes": self.publishes,
            "bytes_per_publish": self.bytes_per_publish,
        }

    def state_dict(self) -> dict[str, float | int]:
        """The raw counters (a training checkpoint keeps them, so a restarted peer's totals go on)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        for key, value in state.items():
            if key not in known:
                raise KeyError(f"ExchangeStats has no counter {key!r}")
            setattr(self, key, type(getattr(self, key))(value))
