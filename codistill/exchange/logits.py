"""Deep Mutual Learning over logit shards (Zhang et al., CVPR 2018), `exchange.mode: logits`.

Every peer draws the same batch at each step. With `staleness: 0` a peer publishes the logits of
its step-k forward pass (before its step-k update) and trains on the others' step-k logits:
simultaneous DML, N forward passes. With `staleness: s > 0` a peer publishes at step k its logits
for batch k + s (one extra no-grad forward, BatchNorm statistics untouched), so the others can use
them at their step k + s: a peer waits only when it is more than s steps ahead of a teacher, and the
signal it uses is exactly s steps stale, whatever the timing. That keeps runs reproducible.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from codistill.config import ExchangeConfig, RunConfig
from codistill.data.dataset import as_tensor, mix_seed
from codistill.errors import CodistillError
from codistill.exchange.base import Exchange
from codistill.exchange.slots import influence_slot, overlapping_ranks
from codistill.exchange.wire import LogitShard, decode_array, encode_tensor, id_dtype, join_shards
from codistill.losses.distill import TeacherSignal
from codistill.losses.divergences import zscore
from codistill.losses.sampled import SampledLogits, sample_logits
from codistill.losses.terms import TeacherOutput
from codistill.losses.topk import TopKLogits, topk_logits
from codistill.peer.topology import consumers_of, part_bounds, rank_slot

if TYPE_CHECKING:
    from codistill.peer import Peer

__all__ = ["LogitExchange", "TeacherMismatch", "decode_shard", "sampled_shard"]


class TeacherMismatch(CodistillError, RuntimeError):
    """A teacher's shard covers other samples than the student's batch: the jobs of the peers differ."""


def decode_shard(shard: LogitShard, device: torch.device | str) -> TeacherSignal:
    """A shard as the loss takes it: full logits, TopKLogits or SampledLogits."""
    if shard.sample_counts is not None and shard.topk_ids is not None and shard.teacher_term is not None:
        return SampledLogits(
            torch.from_numpy(shard.topk_ids.astype(np.int64)).to(device),
            torch.from_numpy(shard.sample_counts.astype(np.int64)).to(device),
            as_tensor(np.asarray(shard.teacher_term)).to(device),
            shard.num_classes,
        )
    values = decode_array(shard.logits, shard.dtype, device)
    if shard.topk_ids is None or shard.lse is None or shard.lse_rest is None:
        return values
    return TopKLogits(
        torch.from_numpy(shard.topk_ids.astype(np.int64)).to(device),
        values,
        as_tensor(np.asarray(shard.lse)).to(device),
        as_tensor(np.asarray(shard.lse_rest)).to(device),
        shard.num_classes,
    )


def sampled_shard(
    batch_step: int, produced_step: int, sample_ids: np.ndarray, drawn: SampledLogits, dtype: str
) -> LogitShard:
    """The wire form of a sampled teacher signal: ids, counts and the teacher's term; no values travel (the
    shard's `logits` is (N, 0) in the wire dtype, for what reads every shard alike)."""
    n, k = drawn.ids.shape
    wire_values = np.int16 if dtype == "bfloat16" else np.dtype(dtype)  # bf16 travels as its raw 16 bits
    return LogitShard(
        batch_step,
        produced_step,
        sample_ids,
        np.zeros((n, 0), dtype=wire_values),
        dtype,
        drawn.ids.cpu().numpy().astype(id_dtype(drawn.num_classes)),
        num_classes=drawn.num_classes,
        sample_counts=drawn.counts.cpu().numpy().astype(id_dtype(k + 1)),
        teacher_term=drawn.teacher_term.cpu().numpy(),
    )


class LogitExchange(Exchange):
    """Deep Mutual Learning over logit shards, with bounded staleness (see module docstring)."""

    shared_batch_order = True

    @classmethod
    def describe(cls, cfg: ExchangeConfig) -> str:
        return f"staleness={cfg.staleness}"

    @classmethod
    def staleness_limit(cls, cfg: ExchangeConfig) -> int:
        return cfg.staleness

    @classmethod
    def held_bytes(cls, cfg: RunConfig, positions_per_batch: int, num_classes: int) -> int:
        # A shard stays until every consumer has a durable checkpoint past its step: a round's worth (or
        # output.checkpoint_every steps) of every publisher's shards, plus the staleness window.
        ex = cfg.exchange
        value_bytes = 4 if ex.dtype == "float32" else 2
        if ex.logits == "topk" and ex.topk < num_classes:
            per_position = ex.topk * (value_bytes + np.dtype(id_dtype(num_classes)).itemsize) + 8  # + lse, lse_rest
        elif ex.logits == "sampled":  # ids, counts, the teacher's term
            per_position = ex.topk * (np.dtype(id_dtype(num_classes)).itemsize + id_dtype(ex.topk + 1).itemsize) + 4
        else:
            per_position = num_classes * value_bytes
        between = min(cfg.output.checkpoint_every or cfg.eval_every, cfg.eval_every) + ex.staleness + 1
        publishers = sum(1 for i in range(cfg.num_peers) if consumers_of(i, cfg.num_peers, ex.topology))
        return 0 if cfg.loss.alpha == 0 else publishers * between * positions_per_batch * per_position

    def start_step(self, peer: Peer, step: int) -> None:
        ids, logits = peer.forward(step)
        if not self.publishes:
            return
        s = self.cfg.exchange.staleness
        if s == 0:
            self._publish(step, step, ids, logits, peer.published_taps())
            return
        # Publish the batch that consumers will train on s steps from now (at step 0 also the first s).
        first = step + s if step > 0 else 0
        for batch_step in range(first, min(step + s, peer.total_steps - 1) + 1):
            ids_b, logits_b, taps_b = peer.lookahead_logits(batch_step)
            self._publish(batch_step, step, ids_b, logits_b, taps_b)

    def _publish(
        self,
        batch_step: int,
        produced_step: int,
        ids: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
    ) -> None:
        if batch_step < self.cfg.loss.burn_in:
            return
        t0 = time.perf_counter()
        sample_ids = ids.numpy().astype(np.int64, copy=False)
        dtype = self.cfg.exchange.dtype
        if self.cfg.exchange.logits == "sampled":
            shard = self._sampled_shard(batch_step, produced_step, sample_ids, logits)
        elif self.cfg.exchange.logits == "topk":
            # standardised first when the loss is (its mean and std need every class: the student cannot)
            z = zscore(logits.float()) if self.cfg.loss.zscore else logits
            top = topk_logits(z, self.cfg.exchange.topk, self.cfg.loss.temperature)
            shard = LogitShard(
                batch_step,
                produced_step,
                sample_ids,
                encode_tensor(top.values, dtype),
                dtype,
                top.ids.cpu().numpy().astype(id_dtype(top.num_classes)),
                top.lse.cpu().numpy(),
                top.lse_rest.cpu().numpy(),
                top.num_classes,
            )
        else:
            shard = LogitShard(batch_step, produced_step, sample_ids, encode_tensor(logits, dtype), dtype)
        if taps:  # what the consumers' hidden-state and attention terms read, beside the logits
            shard.taps = {name: encode_tensor(t, dtype) for name, t in taps.items()}
        self.board.publish_logits(self.slot, shard)  # this rank's part of the batch
        self.stats.bytes_published += shard.nbytes
        self.stats.exchange_s += time.perf_counter() - t0

    def _sampled_shard(
        self, batch_step: int, produced_step: int, sample_ids: np.ndarray, logits: torch.Tensor
    ) -> LogitShard:
        """`exchange.topk` ids drawn per position from this peer's distribution at T (codistill.losses.sampled),
        from a generator seeded by (job seed, peer, rank, batch): a rerun draws the same ids."""
        cfg = self.cfg
        z = zscore(logits.float()) if cfg.loss.zscore else logits  # as the student standardises its own
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(mix_seed(cfg.seed, self.index, self.rank, batch_step))
        drawn = sample_logits(z, cfg.exchange.topk, cfg.loss.temperature, generator)
        return sampled_shard(batch_step, produced_step, sample_ids, drawn, cfg.exchange.dtype)

    def teacher_signals(self, peer: Peer, step: int) -> list[TeacherOutput] | None:
        if not self.distills_at(step):
            return None
        t0 = time.perf_counter()
        out: list[TeacherOutput] = []
        for j, (shard, nbytes) in self._fetch(peer, step, lambda j, q: rank_slot(self.workers, j, q)).items():
            taps = {n: decode_array(a, shard.dtype, peer.device) for n, a in (shard.taps or {}).items()}
            out.append(TeacherOutput(j, decode_shard(shard, peer.device), taps))
            self.stats.bytes_pulled += nbytes
            self.stats.see_staleness(step - shard.produced_step)
        self.stats.exchange_s += time.perf_counter() - t0
        return out

    def _fetch(self, peer: Peer, step: int, slot_of) -> dict[int, tuple[LogitShard, int]]:
        """Each teacher's shard covering this rank's examples of `step` (joined from the teacher's ranks whose
        parts overlap them, all fetched in one request), with the bytes pulled; `slot_of(j, rank)` addresses them."""
        expected_ids = peer.batch_ids(step).numpy()
        lo, hi = part_bounds(self.cfg.data.batch_size, peer.world_size, peer.rank)
        batch = self.cfg.data.batch_size
        ranks = {j: overlapping_ranks(batch, self.workers[j], lo, hi) for j in self.teachers}
        slots = [slot_of(j, q) for j in self.teachers for q in ranks[j]]
        got = dict(zip(slots, self.board.fetch_logits(slots, step, self.slot, self.cfg.exchange.timeout_s)))
        out = {}
        for j in self.teachers:
            parts = [got[slot_of(j, q)] for q in ranks[j]]
            first = part_bounds(batch, self.workers[j], ranks[j][0])[0]
            shard = join_shards(parts, lo - first, hi - first)
            if not np.array_equal(shard.sample_ids, expected_ids):  # a shard is keyed by the samples it covers
                raise TeacherMismatch(
                    f"peer {self.index}: logits of peer {j} for step {step} cover other samples; "
                    f"the peers' batch orders disagree (job seed or data config differ)"
                )
            out[j] = (shard, sum(p.nbytes for p in parts))
        return out

    # -- influence weights: a student's reach the teachers whose terms they scale ------------------

    def measure_influence(self, peer: Peer, step: int, teachers: list[TeacherOutput] | None) -> None:
        super().measure_influence(peer, step, teachers)
        if peer.influence is None or not self.weighting.publishes_to_teachers(self.cfg.loss):
            return
        # Beside the logit shards, at a slot of their own: the consumers' teacher-side terms wait for them.
        t0 = time.perf_counter()
        ids = peer.batch_ids(step).numpy().astype(np.int64, copy=False)
        shard = LogitShard(step, step, ids, encode_tensor(peer.influence, "float32"), "float32")
        self.board.publish_logits(influence_slot(self.workers, self.slot), shard)
        self.stats.bytes_published += shard.nbytes
        self.stats.exchange_s += time.perf_counter() - t0

    def teacher_side_weights(self, peer: Peer, step: int) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        out = []
        fetched = self._fetch(peer, step, lambda j, q: influence_slot(self.workers, rank_slot(self.workers, j, q)))
        for shard, nbytes in fetched.values():
            out.append(decode_array(shard.logits, shard.dtype, peer.device))
            self.stats.bytes_pulled += nbytes
        self.stats.exchange_s += time.perf_counter() - t0
        return out

    def end_step(self, peer: Peer, step: int) -> None:
        self.board.flush()  # a shard held back to ride on a teacher request goes now if none came
