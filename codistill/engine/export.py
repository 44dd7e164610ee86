"""Each language-model peer's final weights as a Hugging Face model folder, `peers/<name>/` beside
`peers/<name>.pt` (`codistill.models.export`), written by the process that writes the final weights (the
LocalEngine, the RayEngine's driver) through `Storage`, so a remote run directory gets it too.

A peer that cannot be exported (no exact Hugging Face equivalent, or an error while exporting) is one line
(an event of the run and the run log) and a `{"skipped": reason}` record: the run and its `.pt` weights are
never lost for it. Image classifiers are not exported and have no record.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from codistill.config import RunConfig
from codistill.data import Dataset
from codistill.storage import Storage, StorageFullError

__all__ = ["export_peers", "peer_export_dir"]

log = logging.getLogger("codistill")


def peer_export_dir(name: str) -> str:
    """The run-relative folder of peer `name`'s Hugging Face export."""
    return f"peers/{name}"


def export_peers(
    cfg: RunConfig,
    dataset: Dataset,
    storage: Storage,
    finals: Mapping[str, dict[str, torch.Tensor]],
    note: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Export every peer of `finals` (name -> final weights on the CPU) of a language-model job; its record for
    summary.json, by name: `{"path": "peers/<name>", "format": "gpt2" | "hf", "model_type", "files",
    "tokenizer"}` or `{"skipped": reason}`. `note` says a skipped peer in one line. Nothing for other tasks."""
    if dataset.task != "causal_lm":
        return {}
    from codistill.data.tokenizers import Tokenizer, tokenizer_from_meta

    tokenizer: Tokenizer | None = None
    try:  # the job's tokenizer, as the dataset was built with it
        tokenizer = tokenizer_from_meta(dataset.meta)
    except Exception as e:
        note(f"export: the tokenizer could not be rebuilt ({_one_line(e)}); the peers are exported without it")
        log.warning("export: tokenizer not rebuilt", exc_info=True)
    records: dict[str, dict[str, Any]] = {}
    for i in range(cfg.num_peers):
        name = cfg.peer_name(i)
        if name not in finals:
            continue
        try:
            records[name] = _export_one(cfg, i, dataset, storage, finals[name], tokenizer)
        except StorageFullError:
            raise  # the run directory is full: the run's own error line says so
        except Exception as e:
            log.warning("export: peer %s failed", name, exc_info=True)
            records[name] = {"skipped": f"{type(e).__name__}: {_one_line(e)}"}
        if "skipped" in records[name]:
            note(f"export: peer {name} is not exported as a Hugging Face model: {records[name]['skipped']}")
    return records


def _export_one(
    cfg: RunConfig, index: int, dataset: Dataset, storage: Storage, weights: dict[str, torch.Tensor], tokenizer: Any
) -> dict[str, Any]:
    from codistill.models import build_model
    from codistill.models.export import export_hf
    from codistill.tasks import task_of

    pc, name = cfg.peers[index], cfg.peer_name(index)
    with torch.device("meta"):  # the architecture only: the weights are the final ones, assigned, not copied
        model = build_model(pc.model, task_of(dataset).input_shape(dataset), dataset.num_classes, pc.model_args)
        if pc.adapter is not None:  # LoRA: its layers, so that the final weights fit; export_hf merges them
            from codistill.models.adapters import add_adapter

            model = add_adapter(model, pc.adapter)
    rel = peer_export_dir(name)
    with tempfile.TemporaryDirectory(prefix="codistill-export-") as tmp:
        result = export_hf(model, weights, tokenizer, Path(tmp), _chat_template(dataset))
        if isinstance(result, str):
            return {"skipped": result}
        storage.delete_dir(rel)  # an earlier driver's export of this run (resumed): no stale file stays
        for file in result.files:
            storage.write(f"{rel}/{file}", (result.folder / file).read_bytes())
    return {
        "path": rel,
        "format": result.format,
        "model_type": result.model_type,
        "files": list(result.files),
        "tokenizer": result.tokenizer,
    }


def _chat_template(dataset: Dataset) -> str | None:
    """ChatML as Jinja when the peers were trained on a chat corpus rendered as ChatML (codistill.data.chat)."""
    chat = dataset.meta.get("chat")
    if not isinstance(chat, dict) or chat.get("template") != "chatml":
        return None
    from codistill.data.chat import CHATML_JINJA

    return CHATML_JINJA


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
