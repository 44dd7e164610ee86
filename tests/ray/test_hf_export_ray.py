"""The RayEngine's driver exports each language-model peer as a Hugging Face model, as the LocalEngine does
(tests/unit/test_hf_export.py)."""

import json

import pytest
import torch

from codistill.api import run_job
from codistill.models import build_model
from tests.helpers import lm_job

pytestmark = pytest.mark.slow


def test_the_ray_driver_writes_each_peer_as_a_hugging_face_model(ray_session, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    cfg = lm_job(
        tmp_path,
        "engine=ray",
        "resources.num_cpus=1",
        "resources.threads_per_peer=1",
        "peers.1.model=hf",
        "peers.1.model_args=" + json.dumps(llama),
        "eval_every=2",
        steps=2,
    )
    summary = run_job(cfg, str(tmp_path / "run"))
    assert [p["export"]["format"] for p in summary["peers"]] == ["gpt2", "hf"]
    for i, peer in enumerate(summary["peers"]):
        folder = tmp_path / "run" / peer["export"]["path"]
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ours = build_model(cfg.peers[i].model, (16,), 256, cfg.peers[i].model_args).eval()
        ours.load_state_dict(torch.load(tmp_path / "run" / "peers" / f"{peer['name']}.pt", weights_only=True))
        tokens = torch.tensor([list(b"the peer learns ")])  # (1, 16)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)  # (1, 16, 256)
        out = model.generate(**tokenizer("the peer", return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert str(tokenizer.decode(out[0])).startswith("the peer")
