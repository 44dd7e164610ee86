"""What travels between peers: numpy arrays (Ray hands numpy out of its object store zero-copy, and
copies torch tensors). bf16 travels as its raw 16 bits: numpy has no bfloat16.

The wire objects themselves are plain numpy, and this module imports torch only in the functions that make
or read tensors: the board actor holds and unpickles shards without torch (a process without torch starts
in 0.7 s and 80 MB instead of 2.9 s and 690 MB)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "LogitShard",
    "WireWeights",
    "decode_array",
    "join_shards",
    "decode_weights",
    "encode_tensor",
    "encode_weights",
    "id_dtype",
    "wire_dtype",
]


def wire_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an `exchange.dtype` name (float32, bfloat16, float16)."""
    import torch

    return getattr(torch, dtype)


def encode_tensor(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A numpy copy in the wire dtype. Always a copy: a view of a live parameter would change under
    the consumer's feet while the publisher keeps training."""
    import torch

    wire = wire_dtype(dtype)
    t = t.detach()
    if t.device.type != "cpu":  # narrowed where it is, so the device-to-host copy moves the wire's bytes only
        t = t.to(dtype=wire)
    t = t.to("cpu", dtype=wire, copy=True)
    return t.view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()


def decode_array(a: np.ndarray, dtype: str, device: torch.device | str = "cpu") -> torch.Tensor:
    import torch

    from codistill.data.dataset import as_tensor

    t = as_tensor(a)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    # to the device in the wire's width, widened there: the host-to-device copy moves the wire's bytes only
    return t.to(device=device).to(dtype=torch.float32)


def id_dtype(num_classes: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids in [0, num_classes)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


@dataclass
class LogitShard:
    """One peer's logits for one batch, keyed by the sample ids they cover: full, (B, C) or (B, T, V);
    top-k (`topk_ids` set; codistill.losses.topk): per position the k largest logits in `logits`
    (N, k), their ids, and the log-sum-exps over all classes and over the rest at the job's temperature;
    or sampled (`sample_counts` set; codistill.losses.sampled): per position the drawn ids in `topk_ids`, how
    often each was drawn, and the teacher's own term of the loss; `logits` is then (N, 0)."""

    batch_step: int  # the step whose batch these logits are for
    produced_step: int  # the publisher's step (weights) when it computed them
    sample_ids: np.ndarray  # int64 (B,)
    logits: np.ndarray  # full: (B, C) or (B, T, V); top-k: (N, k); in the wire dtype
    dtype: str
    topk_ids: np.ndarray | None = None  # (N, k) in id_dtype(num_classes)
    lse: np.ndarray | None = None  # (N,) float32
    lse_rest: np.ndarray | None = None  # (N,) float32
    num_classes: int = 0
    taps: dict[str, np.ndarray] | None = None  # named intermediate tensors loss terms read, (B, ...) in the wire dtype
    sample_counts: np.ndarray | None = None  # sampled: (N, k) in id_dtype(k + 1)
    teacher_term: np.ndarray | None = None  # sampled: (N,) float32

    @property
    def nbytes(self) -> int:
        compact = (self.topk_ids, self.lse, self.lse_rest, self.sample_counts, self.teacher_term)
        extra = (*compact, *(self.taps or {}).values())
        return int(self.logits.nbytes + self.sample_ids.nbytes + sum(a.nbytes for a in extra if a is not None))

    def state_dict(self) -> dict:
        """Tensors and numbers only (a training checkpoint loads with torch.load(weights_only=True))."""
        import torch

        out = {
            "batch_step": self.batch_step,
            "produced_step": self.produced_step,
            "dtype": self.dtype,
            "sample_ids": torch.from_numpy(self.sample_ids.copy()),
            "logits": torch.from_numpy(self.logits.copy()),
        }
        if self.topk_ids is not None and self.lse is not None and self.lse_rest is not None:
            out |= {
                "topk_ids": torch.from_numpy(self.topk_ids.astype(np.int64)),
                "lse": torch.from_numpy(self.lse.copy()),
                "lse_rest": torch.from_numpy(self.lse_rest.copy()),
                "num_classes": self.num_classes,
            }
        if self.topk_ids is not None and self.sample_counts is not None and self.teacher_term is not None:
            out |= {
                "topk_ids": torch.from_numpy(self.topk_ids.astype(np.int64)),
                "sample_counts": torch.from_numpy(self.sample_counts.astype(np.int64)),
                "teacher_term": torch.from_numpy(self.teacher_term.copy()),
                "num_classes": self.num_classes,
            }
        if self.taps:
            out["taps"] = {k: torch.from_numpy(a.copy()) for k, a in self.taps.items()}
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> LogitShard:
        topk = state.get("topk_ids")
        num_classes = int(state.get("num_classes", 0))
        counts = state.get("sample_counts")
        exact = topk is not None and counts is None  # top-k; sampled shards have no log-sum-exps
        return cls(
            int(state["batch_step"]),
            int(state["produced_step"]),
            state["sample_ids"].numpy(),
            state["logits"].numpy(),
            str(state["dtype"]),
            None if topk is None else topk.numpy().astype(id_dtype(num_classes)),
            state["lse"].numpy() if exact else None,
            state["lse_rest"].numpy() if exact else None,
            num_classes,
            {k: t.numpy() for k, t in state["taps"].items()} if "taps" in state else None,
            None if counts is None else counts.numpy().astype(id_dtype(counts.shape[-1] + 1)),
            None if counts is None else state["teacher_term"].numpy(),
        )


@dataclass
class WireWeights:
    """A published checkpoint: the model's state dict as numpy arrays (floats in the wire dtype)."""

    version: int  # the publisher's completed steps when these weights were taken
    dtype: str
    arrays: dict[str, np.ndarray]
    float_keys: frozenset[str]
    location: str | None = None  # instead of arrays: the run-relative folder of the publisher's DCP shards
    shard_bytes: int = 0  # what that folder holds (the weights in the wire dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def state_dict(self) -> dict:
        """Tensors and plain values only (loadable with torch.load(weights_only=True))."""
        import torch

        return {
            "version": self.version,
            "dtype": self.dtype,
            "float_keys": sorted(self.float_keys),
            "arrays": {k: torch.from_numpy(a.copy()) for k, a in self.arrays.items()},
            **({"location": self.location, "shard_bytes": self.shard_bytes} if self.location else {}),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> WireWeights:
        return cls(
            int(state["version"]),
            str(state["dtype"]),
            {k: t.numpy() for k, t in state["arrays"].items()},
            frozenset(state["float_keys"]),
            None if state.get("location") is None else str(state["location"]),
            int(state.get("shard_bytes", 0)),
        )


def encode_weights(state: Mapping[str, torch.Tensor], version: int, dtype: str) -> WireWeights:
    arrays, float_keys = {}, set()
    for k, v in state.items():
        if v.is_floating_point():
            arrays[k] = encode_tensor(v, dtype)
            float_keys.add(k)
        else:
            arrays[k] = v.detach().to("cpu", copy=True).numpy()
    return WireWeights(version, dtype, arrays, frozenset(float_keys))


def decode_weights(w: WireWeights) -> dict[str, torch.Tensor]:
    from codistill.data.dataset import as_tensor

    return {k: decode_array(a, w.dtype) if k in w.float_keys else as_tensor(a) for k, a in w.arrays.items()}


def join_shards(shards: list[LogitShard], lo: int, hi: int) -> LogitShard:
    """Examples [lo, hi) of consecutive shards of one batch (a data-parallel teacher's ranks' parts, in rank
    order), as one shard; lo and hi count from the first shard's first example. Every array leads with
    examples (full logits) or positions (top-k: examples x tokens), so each is cut at the same examples."""
    if len(shards) == 1 and lo == 0 and hi == len(shards[0].sample_ids):
        return shards[0]
    first = shards[0]
    examples = sum(len(s.sample_ids) for s in shards)

    def cut(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        present = [a for a in arrays if a is not None]
        if not present:
            return None
        joined = np.concatenate(present) if len(present) > 1 else present[0]
        per = len(joined) // examples  # rows per example: 1, or tokens per example for top-k positions
        return joined[lo * per : hi * per]

    sample_ids = cut([s.sample_ids for s in shards])
    logits = cut([s.logits for s in shards])
    assert sample_ids is not None and logits is not None
    return LogitShard(
        first.batch_step,
        min(s.produced_step for s in shards),
        sample_ids,
        logits,
        first.dtype,
        cut([s.topk_ids for s in shards]),
        cut([s.lse for s in shards]),
        cut([s.lse_rest for s in shards]),
        first.num_classes,
        {k: cut([s.taps[k] for s in shards if s.taps]) for k in first.taps} if first.taps else None,  # type: ignore[misc]
        cut([s.sample_counts for s in shards]),
        cut([s.teacher_term for s in shards]),
    )
