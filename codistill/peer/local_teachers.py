"""A peer's local teachers (checkpoint mode): frozen copies of other peers, loaded from their published weights
and run on the peer's own batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from codistill.losses.terms import TeacherOutput

__all__ = ["LocalTeacher", "LocalTeachers"]


@dataclass
class LocalTeacher:
    model: nn.Module
    version: int  # the publisher's step at which these weights were produced


class LocalTeachers(dict[int, LocalTeacher]):
    """{peer index: its frozen copy}; `build(index)` makes a peer's model (its weights are loaded after)."""

    def __init__(
        self,
        build: Callable[[int], nn.Module],
        load: Callable[[nn.Module, Mapping[str, torch.Tensor]], None] | None = None,
    ):
        """load(model, weights): how full weights go into a built model (default `load_state_dict`; a sharded
        peer's teachers take each rank's slice)."""
        super().__init__()
        self._build = build
        self._load = load or (lambda model, weights: model.load_state_dict(dict(weights)))

    def _teacher(self, source_index: int) -> LocalTeacher:
        """Peer `source_index`'s frozen copy, built on first use."""
        teacher = self.get(source_index)
        if teacher is None:
            model = self._build(source_index)
            model.eval().requires_grad_(False)
            teacher = self[source_index] = LocalTeacher(model, -1)
        return teacher

    def load(self, source_index: int, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a published checkpoint of peer `source_index` as a frozen local teacher."""
        teacher = self._teacher(source_index)
        self._load(teacher.model, weights)  # copies: the (read-only) arrays are not kept
        teacher.version = version

    def load_with(self, source_index: int, version: int, fill: Callable[[dict[str, Any]], None]) -> None:
        """Like `load`, but `fill({"model": state dict})` writes the weights into the teacher's own tensors in place
        (a sharded teacher's: its own slices), e.g. read from DCP shards."""
        teacher = self._teacher(source_index)
        fill({"model": teacher.model.state_dict()})
        teacher.version = version

    def versions(self) -> dict[int, int]:
        return {j: t.version for j, t in self.items()}

    def signals(
        self,
        x: torch.Tensor,
        autocast: AbstractContextManager,
        taps: Callable[[int, nn.Module], AbstractContextManager[Mapping[str, torch.Tensor]]],
    ) -> list[TeacherOutput]:
        """The teachers' logits and taps (`taps(j, model)` records teacher j's) on inputs x, by teacher index."""
        out = []
        with torch.no_grad(), autocast:
            for j in sorted(self):
                model = self[j].model
                with taps(j, model) as recorded:
                    logits = model(x).float()
                out.append(TeacherOutput(j, logits, dict(recorded)))
        return out
