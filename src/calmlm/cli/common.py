"""What several commands share: the evaluation data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.corpus import prepare_corpus
from ..devices import resolve_device
from ..errors import CalmError, DataError, TokenizerError
from ..io.checkpoint import read_metadata
from ..train.workflows import DEFAULT_CACHE, DataOptions


def training_data_record(path: str) -> dict[str, Any] | None:
    """The ``data`` entry a local checkpoint (or run folder) recorded at training (:meth:`DataOptions.record`)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        folder = folder / "checkpoint"  # a training run folder
    try:
        record = read_metadata(folder).get("data")
    except CalmError:  # not a local calmlm checkpoint
        return None
    return record if isinstance(record, dict) else None


def evaluation_data(model_path: str, model: Any, tok: Any, block_size: int, data: str | None = None,
                    text_field: str = "text", cache_dir: str | None = None) -> tuple[Any, str]:
    """(TokenDataset of ``block_size`` blocks, where it came from): every document of ``data``, or else the
    validation split the model was trained with, rebuilt from its record (or reused from the cache)."""
    if tok.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}; "
                             "pass the tokenizer the model was trained with (--tokenizer)")
    if data is not None:
        blocks, _, info = prepare_corpus(data, tok, cache_dir or DEFAULT_CACHE, block_size, val_fraction=0.0,
                                         text_field=text_field)
        return blocks, info["source"]
    record = training_data_record(model_path)
    if record is None:
        raise DataError(f"{model_path} does not record the data it was trained on, so it has no validation split "
                        "to evaluate; pass --data (the paper's set: --data wikitext103_test_documents.jsonl)")
    _, val, info = prepare_corpus(record.get("spec"), tok, cache_dir or record.get("cache_dir") or DEFAULT_CACHE,
                                  block_size, val_fraction=float(record.get("val_fraction", DataOptions.val_fraction)),
                                  seed=int(record.get("seed", DataOptions.seed)), val_data=record.get("val_data"),
                                  text_field=record.get("text_field", DataOptions.text_field))
    if val is None:
        raise DataError(f"{model_path} was trained without a validation split; pass --data")
    return val, f"validation split of {info['source']} ({info['split']})"
