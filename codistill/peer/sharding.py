"""A sharded peer (`strategy: fsdp`): PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) over the ranks of
its worker group, and the moves between its sharded state and the full weights the rest of codistill reads.

Each unit of `codistill.models.units.shard_units` becomes one FSDP unit, then the root (what is left: the
embeddings, final norm and head). A rank holds 1/W of every parameter, gradient and optimizer state; a unit's
full parameters exist only during its forward and backward (all-gathered, freed after; a teacher frees its
root too, it never runs backward). Gradients are reduce-scattered and averaged over the W ranks, as DDP
averages them, so an FSDP peer trains as its DDP twin does (tests/ray/test_fsdp.py).

On CPU (gloo): the mesh is a CPU mesh, parameters stay float32, and reductions are sums followed by a
division (gloo has no AVG reduce-scatter: `set_force_sum_reduction_for_comms`). On CUDA with `amp`: bf16
parameters for compute, float32 gradient reduction and master weights (`MixedPrecisionPolicy`).
Plain PyTorch, no Ray; every function marked "collective" must be called by every rank in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from codistill.models.units import shard_units

__all__ = ["full_state_dict", "load_full_state_dict", "shard_model"]


def _mesh(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(
    model: nn.Module,
    device: torch.device,
    *,
    bf16: bool = False,
    activation_checkpointing: bool = False,
    frozen: bool = False,
) -> nn.Module:
    """Shard `model` in place across the default process group; returns it. A model on the host is moved to
    `device` unit by unit as each is sharded, so the device never holds the whole model.

    frozen: a teacher (no backward): the root's parameters are freed after each forward too."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    units = shard_units(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no layers to shard one by one (codistill.models.units)")
    mesh = _mesh(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    for unit in units:
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            for m in unit if isinstance(unit, list) else [unit]:
                checkpoint(m)  # keeps parameter names (a wrapper module would rename them)
        fully_shard(unit, **kwargs)
    # the root: `reshard_after_forward` False keeps its (small) parameters for the backward right after
    fully_shard(model, reshard_after_forward=frozen, **kwargs)
    if device.type != "cuda":
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
        _return_freed_host_memory()
    return model


def _return_freed_host_memory() -> None:
    """On a CPU, each unit's gathered parameters and gradients are host allocations of a few to tens of MB, made
    and freed every step. glibc raises its mmap threshold to the largest such block freed (up to 32 MB), after
    which they come from its heap and stay resident when freed: a sharded GPT-2-small rank then peaked at 3.3 GB
    against 1.4 GB (bench figure in docs/design.md). A fixed threshold keeps large blocks mmapped and returned."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's default, now fixed (no dynamic raise)
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's full weights on the CPU (collective; one parameter gathered at a time, copied to the CPU, freed).
    keep: whether this rank keeps them (a rank that does not still takes part in every gather)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in model.state_dict().items():
        full = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
        if keep:
            out[name] = full.to("cpu", copy=True)
    return out


def load_full_state_dict(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load full weights into a sharded model: each rank copies its own slice (no communication); every key of
    the model must be given, and nothing else."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise RuntimeError(
            f"{type(model).__name__}: weights do not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, target in state.items():
            source = torch.as_tensor(weights[name])
            if tuple(source.shape) != tuple(target.shape):
                raise RuntimeError(f"{name}: shape {tuple(source.shape)} for a parameter of {tuple(target.shape)}")
            if isinstance(target, DTensor):
                source = source.to(device=target.device, dtype=target.dtype)
                target.copy_(distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None))
            else:
                target.copy_(source)
