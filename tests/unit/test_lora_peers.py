"""LoRA peers (`peers[i].adapter`, peft): only the adapters train, on a base shared by the job's seed; checkpoint
exchange publishes and loads only the adapters; a local teacher on the same base shares its tensors; built-in
GPT and Hugging Face models alike; a resumed adapter peer goes on exactly."""

import json

import pytest
import torch

from codistill.config import AdapterConfig
from codistill.data import load_dataset
from codistill.engine import LocalEngine
from codistill.errors import ConfigError
from codistill.exchange import in_memory_board, make_exchange
from codistill.models import build_model
from codistill.models.adapters import add_adapter, is_adapter_key, merged
from codistill.peer.peer import base_seed
from tests.helpers import ROOT, TINY_LLAMA, lm_job, make_peer

LORA = "{kind: lora, r: 4, alpha: 8}"
LLAMA = TINY_LLAMA


def lora_job(tmp_path, *sets: str, steps: int = 8, hf: bool = False):
    peers = [f"peers.{i}.adapter={LORA}" for i in range(2)]
    if hf:
        peers += [f"peers.{i}.model=hf" for i in range(2)]
        peers += [f"peers.{i}.model_args={json.dumps(LLAMA)}" for i in range(2)]
    else:  # one base for both: the same GPT sizes
        peers += [f"peers.{i}.model_args={{n_embd: 32}}" for i in range(2)]
    return lm_job(tmp_path, *peers, "exchange.mode=checkpoint", "exchange.period=2", *sets, steps=steps)


@pytest.mark.parametrize("hf", [False, True], ids=["gpt", "hf-llama"])
def test_only_the_adapters_train_and_checkpoint_exchange_publishes_only_them(tmp_path, hf):
    cfg = lora_job(tmp_path, hf=hf)
    dataset = load_dataset(cfg.data)
    peers = [make_peer(cfg, i, dataset) for i in range(2)]
    board = in_memory_board(cfg)
    exchanges = [make_exchange(cfg, i, board) for i in range(2)]
    base = {k: v.clone() for k, v in peers[0].module.state_dict().items() if not is_adapter_key(k)}
    # both peers start from the one base (the job's seed), with their own adapters (their seeds)
    other = peers[1].module.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in base.items())
    trainable = [n for n, p in peers[0].module.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(n) for n in trainable)
    a0 = next(n for n in trainable if "lora_A" in n)
    assert not torch.equal(peers[0].module.state_dict()[a0], other[a0])
    for step in range(6):
        for p, e in zip(peers, exchanges):
            e.start_step(p, step)
        for p, e in zip(peers, exchanges):
            p.train_step(e.teacher_logits(p, step))
            e.end_step(p, step)
    after = peers[0].module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base never moved
    assert not torch.equal(after[a0], other[a0])
    # what was published: the adapters only, a small fraction of the model
    published = peers[0].published_weights()
    assert published and all(is_adapter_key(k) for k in published)
    adapter_numel = sum(v.numel() for v in published.values())
    stats = exchanges[0].stats
    assert stats.publishes == 3 and stats.bytes_published == 3 * 4 * adapter_numel  # float32 on the wire
    assert adapter_numel < 0.3 * sum(v.numel() for v in after.values() if v.is_floating_point())
    # the local teacher runs peer 1's adapters on the very tensors of peer 0's base
    teacher = peers[0].teachers[1]
    own = dict(peers[0].module.named_parameters())
    assert teacher.version >= 2
    for name, tensor in teacher.model.named_parameters():
        if is_adapter_key(name):  # its own tensors, holding peer 1's published adapters
            assert tensor is not own[name] and not torch.equal(tensor, own[name])
        else:
            assert tensor is own[name]


def test_a_run_of_lora_peers_learns_and_reports_bytes_per_publish(tmp_path):
    cfg = lora_job(tmp_path, "exchange.dtype=bfloat16", steps=12)
    engine = LocalEngine(cfg)
    history = engine.run()
    assert all(losses[-1] < losses[0] for losses in engine.step_losses)
    for p in history[-1].peers:
        per = p.exchange.to_dict()["bytes_per_publish"]
        assert p.exchange.publishes == 6 and 0 < per == p.exchange.bytes_published // 6


def test_merged_adapters_compute_what_the_adapted_model_computes():
    torch.manual_seed(0)
    model = add_adapter(build_model("hf", (16,), 50, LLAMA), AdapterConfig(r=4))  # peft's llama default: q, v
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the adapters do something
    tokens = torch.randint(0, 50, (2, 16))
    plain = merged(model)
    assert not any(is_adapter_key(k) for k in plain.state_dict())
    torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-4, atol=1e-5)


def test_adapter_config_is_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^peers.0.adapter.r: got 0; allowed: an integer in \[1, 4096\]"):
        lm_job(tmp_path, "peers.0.adapter={kind: lora, r: 0}")
    with pytest.raises(ConfigError, match=r"^peers.0.adapter.kind: got 'dora'"):
        lm_job(tmp_path, "peers.0.adapter={kind: dora}")
    with pytest.raises(ConfigError, match=r"^peers.0.adapter: .*strategy=fsdp"):
        lm_job(tmp_path, "peers.0.adapter={kind: lora}", "peers.0.strategy=fsdp", "peers.0.workers=2")
    with pytest.raises(ValueError, match=r"adapter.target_modules: \['nope'\] in GPT"):
        add_adapter(build_model("gpt-tiny", (16,), 50), AdapterConfig(target_modules=("nope",)))


def test_a_resumed_adapter_peer_goes_on_exactly(tmp_path):
    cfg = lora_job(tmp_path, steps=8)
    dataset = load_dataset(cfg.data)

    def start():
        peers = [make_peer(cfg, i, dataset) for i in range(2)]
        board = in_memory_board(cfg)
        return peers, [make_exchange(cfg, i, board) for i in range(2)]

    def steps(peers, exchanges, first, last):
        for step in range(first, last):  # as the LocalEngine: every peer's phase before the next phase
            for p, e in zip(peers, exchanges):
                e.start_step(p, step)
            for p, e in zip(peers, exchanges):
                p.train_step(e.teacher_logits(p, step))
            for p, e in zip(peers, exchanges):
                e.end_step(p, step)

    reference, ref_exchanges = start()
    steps(reference, ref_exchanges, 0, 8)
    want = [[s.loss for s in p.take_losses()][4:] for p in reference]
    peers, exchanges = start()
    steps(peers, exchanges, 0, 4)
    for p in peers:
        torch.save(p.training_state(), tmp_path / f"{p.name}.pt")
    resumed, _ = start()
    for p in resumed:
        p.load_training_state(torch.load(tmp_path / f"{p.name}.pt", weights_only=True))
    steps(resumed, exchanges, 4, 8)  # the board (its published versions) outlives the peers, as on Ray
    for i, p in enumerate(resumed):
        assert [s.loss for s in p.take_losses()] == pytest.approx(want[i], rel=1e-6)


def test_the_bundled_lora_job_validates_and_its_base_seed_is_the_jobs():
    from codistill.config import load_job

    cfg = load_job(str(ROOT / "jobs" / "lm_lora.yaml"))
    assert all(p.adapter is not None and p.adapter.r == 8 for p in cfg.peers)
    assert base_seed(0) == base_seed(0) != base_seed(1)
