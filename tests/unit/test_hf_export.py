"""Hugging Face export (codistill.models.export, codistill.engine.export): the built-in GPT as an equivalent GPT-2
and `hf` models as themselves, reloaded offline with `from_pretrained` to the same logits; the job's tokenizer
saved beside them encodes to the job's ids; a run writes `peers/<name>/` and summary.json says so; MLflow logs
the export with the transformers flavour."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from codistill.api import run_job
from codistill.config import load_job
from codistill.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer
from codistill.models import build_model
from codistill.models.export import export_hf, hf_tokenizer
from codistill.models.gpt import GPT
from tests.helpers import ROOT, lm_job, small_job, tiny_text

TEXTS = [
    "the peer learns from its teachers",
    "  leading spaces, a tab\tand a newline\n",
    "héllo wörld, 日本語 and 🎉 — non-ASCII",
    "a . b , c 's n't",  # what clean_up_tokenization_spaces would change
    "",
]

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with every parameter moved off its initialisation (LayerNorm weights 1, biases 0 would hide a
    mapping that drops or swaps them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _meta(name: str, block_size: int, vocab: int, model_args: dict) -> torch.nn.Module:
    with torch.device("meta"):  # as the engines build it for an export
        return build_model(name, (block_size,), vocab, model_args)


class _Events:
    """What a run says (a Reporter's events)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_event(self, message: str) -> None:
        self.events.append(message)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("bias", [True, False])
def test_the_gpt_exports_as_a_gpt2_with_the_same_logits(tmp_path, monkeypatch, bias):
    _offline(monkeypatch)
    torch.manual_seed(0)
    args = {"n_layer": 2, "n_head": 2, "n_embd": 64, "bias": bias}
    gpt = _perturbed(build_model("gpt-tiny", (16,), 256, args))
    assert isinstance(gpt, GPT)
    result = export_hf(_meta("gpt-tiny", 16, 256, args), gpt.state_dict(), ByteTokenizer(), tmp_path)
    assert not isinstance(result, str), result
    assert result.format == "gpt2" and result.model_type == "gpt2" and result.tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["n_positions"] == 16 and config["vocab_size"] == 256
    model, tokenizer = _load(tmp_path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, gpt(tokens), atol=1e-5, rtol=1e-5)  # (B, T, V)
    ids = tokenizer("the peer", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [list(b"the peer")]


def test_an_hf_model_exports_as_itself_and_generates_text(tmp_path, monkeypatch):
    _offline(monkeypatch)
    torch.manual_seed(0)
    llama = _perturbed(build_model("hf", (32,), 256, LLAMA))
    result = export_hf(_meta("hf", 32, 256, LLAMA), llama.state_dict(), ByteTokenizer(), tmp_path)
    assert not isinstance(result, str), result
    assert result.format == "hf" and result.model_type == "llama"
    model, tokenizer = _load(tmp_path)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, llama(tokens), atol=1e-5, rtol=1e-5)  # (B, T, V)
    prompt = tokenizer("the peer", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # (1, 8 + 8)
    assert out.shape == (1, 16) and out[0, :8].tolist() == list(b"the peer")
    assert tokenizer.decode(out[0]).startswith("the peer")


def test_a_padded_output_layer_is_exported_whole_and_generate_never_picks_a_padded_id(tmp_path, monkeypatch):
    """An output layer padded past the tokenizer (320 columns, 256 byte tokens) is the model as it is; its
    generation config suppresses the 64 ids no token has, so generated text always decodes."""
    _offline(monkeypatch)
    torch.manual_seed(0)
    args = {**LLAMA, "vocab_size": 320}
    llama = _perturbed(build_model("hf", (32,), 256, args))
    head: Any = llama.hf_model.lm_head  # type: ignore[union-attr]
    with torch.no_grad():  # make the padded columns the likeliest: generate must still not pick them
        head.weight[256:] *= 50
    result = export_hf(_meta("hf", 32, 256, args), llama.state_dict(), ByteTokenizer(), tmp_path)
    assert not isinstance(result, str), result
    model, tokenizer = _load(tmp_path)
    assert model.config.vocab_size == 320 and len(tokenizer) == 256
    out = model.generate(**tokenizer("the", return_tensors="pt"), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert int(out.max()) < 256


@pytest.mark.parametrize(("name", "args"), [("gpt-tiny", {"n_embd": 32}), ("hf", LLAMA)])
def test_lora_adapters_are_merged_into_a_plain_model_with_the_same_logits(tmp_path, monkeypatch, name, args):
    """A LoRA peer (adapters injected in place, codistill.models.adapters) exports as a plain model: no peft
    needed to load it, the adapted model's logits."""
    pytest.importorskip("peft")
    from codistill.config import AdapterConfig
    from codistill.models.adapters import add_adapter

    _offline(monkeypatch)
    adapter = AdapterConfig(r=4, alpha=8.0)
    torch.manual_seed(0)
    peer = add_adapter(_perturbed(build_model(name, (16,), 256, args)), adapter)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B starts at zero (the adapted model is its base): move it
        for key, p in peer.named_parameters():
            if "lora_B" in key:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peer.eval()
    with torch.device("meta"):
        skeleton = add_adapter(build_model(name, (16,), 256, args), adapter)
    result = export_hf(skeleton, peer.state_dict(), ByteTokenizer(), tmp_path)
    assert not isinstance(result, str), result
    model, _ = _load(tmp_path)
    assert not any("lora" in k for k in model.state_dict())
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, peer(tokens), atol=1e-5, rtol=1e-5)  # (B, T, V)


def test_a_chatml_trained_peer_exports_the_template_it_was_trained_with(tmp_path, monkeypatch):
    from codistill.data.chat import CHATML_JINJA, chatml

    _offline(monkeypatch)
    gpt = build_model("gpt-tiny", (16,), 256)
    result = export_hf(_meta("gpt-tiny", 16, 256, {}), gpt.state_dict(), ByteTokenizer(), tmp_path, CHATML_JINJA)
    assert not isinstance(result, str), result
    _, tokenizer = _load(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}]
    messages.append({"role": "assistant", "content": "héllo"})
    for prompt in (False, True):  # as the peer saw its training conversations, and a prompt to answer
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert rendered == chatml(messages, prompt)


def test_a_model_without_a_hugging_face_equivalent_is_a_reason_and_nothing_is_written(tmp_path):
    mlp = build_model("mlp", (1, 8, 8), 10)
    reason = export_hf(mlp, mlp.state_dict(), None, tmp_path / "out")
    assert reason == f"no Hugging Face equivalent for {type(mlp).__name__}"
    assert not (tmp_path / "out").exists()


def _bpe() -> BPETokenizer:
    return BPETokenizer.train(tiny_text() + "héllo wörld 日本語 🎉\n", 300)


@pytest.mark.parametrize("kind", ["byte", "bpe", "hf"])
def test_the_saved_tokenizer_encodes_to_the_jobs_ids(tmp_path, monkeypatch, kind):
    """AutoTokenizer.from_pretrained of the export folder encodes every text to the job tokenizer's ids, and
    decodes them back as the job's tokenizer does."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _offline(monkeypatch)
    job: Tokenizer
    if kind == "byte":
        job = ByteTokenizer()
    elif kind == "bpe":
        job = _bpe()
    else:  # hf:<a local folder>: a Hugging Face tokenizer of the job's own
        source = tmp_path / "source"
        PreTrainedTokenizerFast(tokenizer_object=_bpe().tokenizer, clean_up_tokenization_spaces=False).save_pretrained(
            source
        )
        job = HFTokenizer.load(str(source))
    hf_tokenizer(job).save_pretrained(tmp_path / "export")
    saved = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert len(saved) == job.vocab_size
    for text in TEXTS:  # the empty text too (HFTokenizer.encode("") raised IndexError: no chunks, an empty batch)
        ids = saved(text, add_special_tokens=False)["input_ids"]
        assert ids == job.encode(text).tolist(), text
        assert saved.decode(ids) == job.decode(np.asarray(ids, dtype=np.int64)) == text
    if kind == "byte":  # an invalid UTF-8 sequence decodes as errors="replace": only its bytes become U+FFFD
        bad = [116, 104, 101, 32, 119, 131, 253, 78, 226]
        assert saved.decode(bad) == job.decode(np.asarray(bad)) == "the w\ufffd\ufffdN\ufffd"


def test_the_byte_tokenizers_alphabet_is_the_byte_level_one():
    from tokenizers import pre_tokenizers

    from codistill.models.export import _byte_alphabet

    table = _byte_alphabet()
    assert sorted(table) == list(range(256))
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_a_language_model_run_writes_each_peer_as_a_hugging_face_model(tmp_path, monkeypatch):
    """lm_hf's padded Qwen2-type peer beside a built-in GPT, a few steps on the LocalEngine: each peer's
    folder beside its .pt, the summary's `export` records, and each folder loads and generates text."""
    _offline(monkeypatch)
    hf_peer = dict(load_job(str(ROOT / "jobs" / "lm_hf.yaml")).peers[0].model_args)
    cfg = lm_job(tmp_path, "peers.1.model=hf", "peers.1.model_args=" + json.dumps(hf_peer), "eval_every=2", steps=4)
    summary = run_job(cfg, str(tmp_path / "run"))
    formats = {}
    for peer in summary["peers"]:
        export = peer["export"]
        name = peer["name"]
        assert export["path"] == f"peers/{name}" and export["tokenizer"]
        formats[name] = export["format"]
        folder = tmp_path / "run" / "peers" / name
        assert (tmp_path / "run" / "peers" / f"{name}.pt").is_file()
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
        assert sorted(export["files"]) == sorted(p.name for p in folder.iterdir())
        model, tokenizer = _load(folder)
        out = model.generate(**tokenizer("the peer", return_tensors="pt"), max_new_tokens=6, do_sample=False)
        assert tokenizer.decode(out[0]).startswith("the peer") and out.shape[1] > 8
    assert sorted(formats.values()) == ["gpt2", "hf"]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [p["export"] for p in written["peers"]] == [p["export"] for p in summary["peers"]]


def test_a_lora_peer_of_a_run_is_exported_merged(tmp_path, monkeypatch):
    """The engines build an adapter peer's skeleton with its adapters (engine.export): its export is the plain
    GPT-2 whose logits are the trained adapted model's."""
    pytest.importorskip("peft")
    from codistill.models.adapters import add_adapter

    _offline(monkeypatch)
    cfg = lm_job(tmp_path, "peers.0.adapter={r: 4}", "eval_every=2", steps=2)
    summary = run_job(cfg, str(tmp_path / "run"))
    peer = summary["peers"][0]
    assert peer["export"]["format"] == "gpt2"
    model, _ = _load(tmp_path / "run" / peer["export"]["path"])
    adapter = cfg.peers[0].adapter
    assert adapter is not None
    trained = add_adapter(build_model("gpt-tiny", (16,), 256, cfg.peers[0].model_args), adapter).eval()
    trained.load_state_dict(torch.load(tmp_path / "run" / "peers" / f"{peer['name']}.pt", weights_only=True))
    tokens = torch.tensor([list(b"the peer learns ")])  # (1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, trained(tokens), atol=1e-5, rtol=1e-5)  # (1, 16, 256)


def test_an_image_classifier_run_has_no_export(tmp_path):
    summary = run_job(small_job(steps=2, models=("mlp",)), str(tmp_path / "run"))
    assert "export" not in summary["peers"][0]
    assert sorted(p.name for p in (tmp_path / "run" / "peers").iterdir()) == ["peer0-mlp.pt"]


def test_a_peer_that_cannot_be_exported_is_one_line_and_a_skipped_record(tmp_path, monkeypatch):
    """An export that fails (here: raises) loses neither the run nor the other peers' exports."""
    import codistill.models.export as export

    _offline(monkeypatch)
    real = export.export_hf

    def flaky(model, weights, tokenizer, folder, *args, **kwargs):
        if isinstance(model, GPT) and model.tok_emb.embedding_dim == 48:
            raise RuntimeError("disk on fire\nsecond line")
        return real(model, weights, tokenizer, folder, *args, **kwargs)

    monkeypatch.setattr(export, "export_hf", flaky)
    from codistill.engine.report import Reporter

    class Events(_Events, Reporter):
        pass

    reporter = Events()
    summary = run_job(lm_job(tmp_path, "eval_every=2", steps=2), str(tmp_path / "run"), reporter=reporter)
    first, second = (p["export"] for p in summary["peers"])
    assert first["format"] == "gpt2"
    assert second == {"skipped": "RuntimeError: disk on fire"}
    name = summary["peers"][1]["name"]
    assert [e for e in reporter.events if e.startswith("export:")] == [
        f"export: peer {name} is not exported as a Hugging Face model: RuntimeError: disk on fire"
    ]
    assert not (tmp_path / "run" / "peers" / name).exists() and (tmp_path / "run" / "peers" / f"{name}.pt").is_file()


@pytest.mark.slow
def test_mlflow_logs_the_export_with_the_transformers_flavour_else_with_pytorch_and_the_folder(tmp_path, monkeypatch):
    """The first peer's export is a transformers-flavour model (a text-generation pipeline that generates); the
    second's logging with that flavour fails (made to): one warning, its model with the pytorch flavour as
    today, and its Hugging Face folder as artifacts `hf/` of its run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import codistill.tracking.models as tracking_models
    from codistill.engine.report import Reporter

    _offline(monkeypatch)
    real = tracking_models.log_hf_model

    def fails_for_the_second(run_id: str, name: str, folder: Path) -> None:
        if name.startswith("peer1"):
            raise AttributeError("'str' object has no attribute '__name__'")  # as MLflow 3.17's path form does
        real(run_id, name, folder)

    monkeypatch.setattr(tracking_models, "log_hf_model", fails_for_the_second)

    class Events(_Events, Reporter):
        pass

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = lm_job(
        tmp_path,
        "tracking.backend=mlflow",
        f"tracking.uri={uri}",
        "tracking.experiment=codistill-export",
        "eval_every=2",
        steps=2,
    )
    reporter = Events()
    summary = run_job(cfg, str(tmp_path / "run"), reporter)
    first, second = (p["name"] for p in summary["peers"])
    warnings = [e for e in reporter.events if e.startswith("warning: MLflow")]
    assert len(warnings) == 1 and f"peer {second} with mlflow.transformers" in warnings[0], reporter.events
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["codistill-export"])
    peers = {r["tags.codistill.peer"]: r for _, r in runs[runs["tags.mlflow.parentRunId"].notna()].iterrows()}
    assert sorted(peers) == sorted([first, second])
    models = {}
    for name, peer in peers.items():
        found = client.search_logged_models(
            experiment_ids=[peer["experiment_id"]], filter_string=f"source_run_id = '{peer['run_id']}'"
        )
        assert len(found) == 1 and found[0].name == name
        models[name] = found[0].model_uri
    assert "transformers" in mlflow.models.get_model_info(models[first]).flavors
    pipeline = mlflow.transformers.load_model(models[first])
    text = pipeline("the peer", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the peer") and len(text) > len("the peer")
    assert "pytorch" in mlflow.models.get_model_info(models[second]).flavors
    logged = {a.path for a in client.list_artifacts(peers[second]["run_id"], "hf")}
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= logged
