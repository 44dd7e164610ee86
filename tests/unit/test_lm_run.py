"""Language-model peers end to end on the LocalEngine: a seeded lockstep run against its golden losses,
top-k shards against full ones, what evaluation sends, the summary's record of the text, and a
vocabulary mismatch refused before anything starts."""

import json
import os
from pathlib import Path

import pytest
import torch

from codistill.api import run_job
from codistill.config import load_job
from codistill.engine import LocalEngine
from codistill.errors import ConfigError
from tests.helpers import ROOT, lm_job

GOLDEN = Path(__file__).parent / "golden" / "lm_lockstep_losses.json"


def test_lm_lockstep_losses_match_golden_file(tmp_path):
    engine = LocalEngine(lm_job(tmp_path, steps=20))
    engine.run()
    got = {engine.cfg.peer_name(i): engine.step_losses[i] for i in range(2)}
    if os.environ.get("CODISTILL_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"torch": torch.__version__.split("+")[0], "losses": got}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    for name, want in golden["losses"].items():
        assert got[name] == pytest.approx(want, rel=1e-4, abs=1e-6), (name, golden["torch"], torch.__version__)
    assert got[name][-1] < got[name][0]  # it learns


def test_topk_shards_with_k_equal_to_the_vocabulary_train_as_full_ones_and_small_k_moves_fewer_bytes(tmp_path):
    runs = {}
    for label, sets in {
        "full": (),
        "k=V": ("exchange.logits=topk", "exchange.topk=256"),
        "k=8": ("exchange.logits=topk", "exchange.topk=8"),
    }.items():
        engine = LocalEngine(lm_job(tmp_path, *sets, steps=10))
        history = engine.run()
        runs[label] = (engine.step_losses, history[-1].peers[0].exchange.bytes_published)
    for i in range(2):
        assert runs["k=V"][0][i] == pytest.approx(runs["full"][0][i], rel=1e-4)
    # per position: full 256 float32 = 1024 B; k=8: 8 uint8 ids + 8 float32 + 2 float32 lse = 48 B
    assert runs["k=8"][1] < runs["full"][1] / 15
    assert runs["k=V"][0] != runs["k=8"][0]


def test_evaluation_sends_no_full_logits_and_the_summary_records_the_text(tmp_path):
    cfg = lm_job(tmp_path, steps=10)
    summary = run_job(cfg, str(tmp_path / "run"))
    assert summary["task"] == "causal_lm"
    assert summary["data"]["tokenizer"] == "byte" and len(summary["data"]["corpus_sha256"]) == 64
    again = run_job(lm_job(tmp_path, steps=10), str(tmp_path / "run2"))
    assert again["data"]["corpus_sha256"] == summary["data"]["corpus_sha256"]
    assert summary["ensemble"]["test_accuracy"] is None and summary["ensemble"]["test_loss"] > 0
    peer = summary["peers"][0]
    assert peer["perplexity"] == pytest.approx(torch.tensor(peer["test_loss"]).exp().item(), rel=1e-5)
    engine = LocalEngine(cfg)
    history = engine.run()
    positions = 32 * 16  # limit_test windows x block_size
    for p in history[-1].peers:
        assert p.eval.count == positions
        # per position a top-1 id and p(true) (8 bytes, not 256 x 4), plus full log-probs on at most 256
        # positions for the pairwise KL: bounded whatever the size of the evaluation set
        assert p.eval.top1.nbytes + p.eval.p_true.nbytes == positions * 8
        assert p.eval.subset_log_probs.shape == (256, 256) and p.eval.topk_ids is None
        assert p.eval.nbytes == positions * 8 + 256 * 256 * 4


def test_a_model_whose_output_layer_is_smaller_than_the_tokenizer_is_refused_before_anything_starts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "llama-200"
    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    job = lm_job(tmp_path, f"peers.1.model=hf:{model_dir}", "peers.1.model_args={}")
    with pytest.raises(ConfigError, match=r"^peers.1.model: .*output layer has 200 logits.*tokenizer has 256 tokens"):
        run_job(job, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("job", ["lm_quickstart", "lm_dml_bpe", "lm_codistill", "lm_hf"])
def test_bundled_lm_jobs_validate(job):
    cfg = load_job(str(ROOT / "jobs" / f"{job}.yaml"))
    assert cfg.data.name == "text" and cfg.num_peers == 2


def test_hugging_face_peers_with_differently_padded_vocabularies_train_together(tmp_path):
    """lm_hf's two Qwen2-type configs (from configs, offline), output layers padded past the byte tokenizer by
    different amounts, at the job's sizes: a few lockstep steps on the LocalEngine."""
    job = load_job(str(ROOT / "jobs" / "lm_hf.yaml"))
    peers = [dict(p.model_args) for p in job.peers]
    cfg = lm_job(
        tmp_path,
        "peers.0.model=hf",
        "peers.1.model=hf",
        "peers.0.model_args=" + json.dumps(peers[0]),
        "peers.1.model_args=" + json.dumps(peers[1]),
        steps=6,
    )
    assert sorted(p["vocab_size"] for p in peers) == [320, 384]  # padded past the 256 byte tokens, differently
    engine = LocalEngine(cfg)
    history = engine.run()
    assert [p.model for p in history[-1].peers] == ["hf", "hf"]
    assert all(len(losses) == 6 and losses[-1] < losses[0] for losses in engine.step_losses)
