"""A sharded peer (strategy fsdp) without Ray: bad layouts fail in one line before anything starts, and two
processes (gloo, as a Ray Train group of 2 on CPU) shard a student and its teacher of another architecture."""

import os
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from codistill.data import load_dataset
from codistill.engine.preflight import check_job
from codistill.errors import ConfigError
from tests.helpers import ROOT, lm_job, small_job

FSDP = ("engine=ray", "peers.0.workers=2", "peers.0.strategy=fsdp")
OTHER_TEACHER = "peers.1.model_args={n_layer: 3, n_head: 2, n_embd: 24}"  # another depth and width than peer 0


def test_bad_layouts_fail_in_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"^peers.0.workers: got 1; allowed: at least 2 with strategy=fsdp"):
        small_job("engine=ray", "peers.0.strategy=fsdp")
    with pytest.raises(ConfigError, match=r"^peers.0.strategy: got 'fsdp'; allowed: 'ddp' with engine=local"):
        small_job("peers.0.workers=2", "peers.0.strategy=fsdp", "engine=local")
    with pytest.raises(ConfigError, match=r"^peers.0.strategy: got 'fsdp'; allowed: 'ddp' with loss.weighting=inf"):
        small_job(*FSDP, "loss.weighting=influence", "data.validation_fraction=0.1")
    with pytest.raises(ConfigError, match=r"activation_checkpointing: got True; allowed: false with strategy=ddp"):
        small_job("peers.0.activation_checkpointing=true")
    with pytest.raises(ConfigError, match=r"^peers.0.strategy: got 'zero3'; allowed: 'ddp' | 'fsdp'"):
        small_job("peers.0.strategy=zero3")
    with pytest.raises(ConfigError, match=r"^exchange.gather_max_mb: got -1.0; allowed: a finite number >= 0"):
        small_job("exchange.gather_max_mb=-1")
    cfg = small_job(*FSDP, models=("mlp", "cnn"))  # an MLP has no blocks or stages
    with pytest.raises(ConfigError, match=r"^peers.0.strategy: got 'fsdp'; allowed: 'ddp' for model mlp: it has no"):
        check_job(cfg)


def test_a_model_without_layers_to_shard_fails_at_the_command_line_before_ray_starts(tmp_path):
    argv = [sys.executable, "-m", "codistill.run", "--config", "quickstart", "--output", str(tmp_path / "run")]
    argv += ["--set", "engine=ray", "--set", "peers.0.workers=2", "--set", "peers.0.strategy=fsdp"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "peers.0.strategy" in r.stderr and "no layers" in r.stderr, r.stderr
    assert "Started a local Ray" not in r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_rank(rank: int, world_size: int, port: int, cfg, teacher_weights: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from codistill.engine.peer_start import peer_start
    from codistill.peer import Peer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        peer = Peer(peer_start(cfg, 0).with_rank(rank, world_size), load_dataset(cfg.data))
        peer.set_teacher(1, 4, teacher_weights)
        teacher = peer.teachers[1].model
        # each rank holds a slice of every sharded teacher parameter, not the whole
        local = {k: v.to_local().numel() for k, v in teacher.state_dict().items() if isinstance(v, DTensor)}
        assert local and sum(local.values()) < sum(t.numel() for t in teacher_weights.values())
        calls: list[int] = []  # forward passes of the first attention: recomputed in the backward pass or not
        attn: Any = peer.module.get_submodule("blocks.0.attn")
        attn.register_forward_hook(lambda *_: calls.append(1))
        ids, _ = peer.forward(0)
        (signal,) = peer.local_teacher_signals()
        before = {k: v.detach().clone() for k, v in peer.weights().items()}
        peer.train_step([signal])
        assert len(calls) == (2 if cfg.peers[0].activation_checkpointing else 1), calls
        after = peer.weights()  # gathered onto rank 0
        if rank == 0:
            changed = any(not torch.equal(before[k], after[k]) for k in after)
            part = (peer.part.start, peer.part.stop)
            torch.save({"ids": ids, "logits": signal.logits, "changed": changed, "part": part}, out)
        else:
            assert after == {}
            torch.save({"ids": ids, "logits": signal.logits, "part": (peer.part.start, peer.part.stop)}, out + ".1")
        dist.barrier()  # no rank tears gloo down while another still sends
    finally:
        dist.destroy_process_group()


HF_LLAMA = (  # a Hugging Face Llama-type decoder, built offline from its config: its units are its decoder layers
    "peers.1.model=hf",
    "peers.1.model_args={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2}",
)


@pytest.mark.parametrize("recompute, teacher_sets", [(False, (OTHER_TEACHER,)), (True, HF_LLAMA)], ids=["gpt", "hf"])
def test_a_sharded_student_runs_its_teacher_of_another_architecture_sharded_with_the_unsharded_logits(
    tmp_path, recompute, teacher_sets
):
    """Two ranks shard the GPT student and its teacher of another architecture (a 3-layer GPT; a Llama-type
    Hugging Face model), each rank 1/2 of each; the teacher's logits on each rank's part of the batch equal the
    whole teacher's, run unsharded in this process, and the student trains (also with its blocks' activations
    recomputed in the backward pass)."""
    from codistill.models import build_model
    from codistill.tasks import task_of
    from tests.helpers import make_peer

    recomputed = (f"peers.0.activation_checkpointing={str(recompute).lower()}",)
    cfg = lm_job(tmp_path, *FSDP, *recomputed, *teacher_sets, "exchange.mode=checkpoint", "exchange.period=4")
    dataset = load_dataset(cfg.data)
    torch.manual_seed(3)
    shape, pc = task_of(dataset).input_shape(dataset), cfg.peers[1]
    teacher = build_model(pc.model, shape, dataset.num_classes, model_args=pc.model_args).eval()
    weights = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_sharded_rank, args=(2, _free_port(), cfg, weights, out), nprocs=2)
    ranks = [torch.load(out, weights_only=True), torch.load(out + ".1", weights_only=True)]
    assert ranks[0]["changed"]
    whole = make_peer(lm_job(tmp_path, *teacher_sets, "exchange.mode=checkpoint"), 0, dataset)  # one process
    ids, x, _ = whole.data.batch(0)
    with torch.no_grad():
        want = teacher(x)  # (B, T, V), the whole batch
    for r in ranks:
        part = slice(*r["part"])
        assert torch.equal(r["ids"], ids[part])
        torch.testing.assert_close(r["logits"], want[part], rtol=1e-5, atol=1e-5)
