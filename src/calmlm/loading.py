"""``calmlm.load``: one entry point for every checkpoint calmlm can read.

* a local folder in calmlm's native format (``config.json`` with ``"kind"`` + safetensors), via
  :func:`calmlm.checkpoint.load_model`;
* a local folder in the CALM reference format (``config.json`` with ``"architectures"`` + ``pytorch_model.bin``
  or safetensors, possibly sharded), via :func:`calmlm.reference.load_reference`;
* a Hugging Face repository id (``cccczshao/CALM-M``), downloaded with ``huggingface_hub.snapshot_download``
  (only the config, weight and tokenizer files) and then read as above.

The returned model (eval mode) carries its tokenizer as ``model.tokenizer``: a
:class:`calmlm.tokenizer.Tokenizer` when the folder has ``tokenizer.json`` or ``tokenizer.model``, else None.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

KINDS = ("autoencoder", "calm", "baseline")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# What a model needs from a Hub repository: no optimizer states, training args or README images.
HUB_PATTERNS = [
    "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def load(path_or_repo_id: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         kind: str | None = None, *, autoencoder: str | Path | None = None, revision: str | None = None,
         load_tokenizer: bool = True) -> nn.Module:
    """Load an Autoencoder, CALM or BaselineLM (eval mode) from a folder or a Hugging Face repo id.

    ``dtype=None`` keeps the stored dtype. ``kind`` ("autoencoder" | "calm" | "baseline") rejects a checkpoint
    of another kind. ``autoencoder``: for a reference CALM checkpoint, the autoencoder folder whose config to
    use instead of inferring it from the weights. ``revision``: a Hub branch, tag or commit.
    The tokenizer found beside the weights is attached as ``model.tokenizer`` (None when there is none)."""
    if kind is not None and kind not in KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {list(KINDS)}")
    directory = resolve(path_or_repo_id, revision)
    fmt = detect_format(directory)
    if fmt == "native":
        from .checkpoint import load_model

        model = load_model(directory, device=device, dtype=dtype, expect=kind)
    else:
        from .reference import load_reference

        model = load_reference(directory, device=device, dtype=dtype, autoencoder=autoencoder)
        got = model.config.kind
        if kind is not None and got != kind:
            raise CheckpointError(f"{path_or_repo_id} holds a {got} model (reference format), expected a {kind}; "
                                  "pass the right checkpoint")
    model.tokenizer = load_tokenizer_from(directory, model) if load_tokenizer else None
    return model


def resolve(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder for ``path_or_repo_id``: the path itself if it exists, else a Hub download."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if path.is_file():  # e.g. .../pytorch_model.bin or config.json: its folder is the checkpoint
            path = path.parent
        if not (path / "config.json").exists() and (path / "checkpoint" / "config.json").exists():
            path = path / "checkpoint"  # a training run folder: use its latest checkpoint
        return path
    name = str(path_or_repo_id)
    if not looks_like_repo_id(name):
        raise CheckpointError(f"no checkpoint at {name}: the folder does not exist (and it is not a Hugging "
                              "Face repo id like 'cccczshao/CALM-M'); check the path")
    return download(name, revision)


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a repository's config, weights and tokenizer into the Hugging Face cache; returns the folder."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown or gated repository, disk full...
        raise CheckpointError(
            f"no local folder {repo_id!r} and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name, go online "
            "(or `huggingface-cli login` for a gated repository), or download it elsewhere with "
            f"`huggingface-cli download {repo_id} --local-dir DIR` and pass DIR") from None


def detect_format(directory: Path) -> str:
    """'native' (config.json has "kind") or 'reference' (config.json has "architectures"/"model_type")."""
    from .reference import read_json

    config = directory / "config.json"
    if not config.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10] if directory.is_dir() else []
        raise CheckpointError(f"{directory} is not a model folder of a known format: it has no config.json "
                              f"(found: {present or 'nothing'}); calmlm reads its own checkpoints (config.json + "
                              "model.safetensors) and reference ones (config.json + pytorch_model.bin)")
    data = read_json(config)
    if "kind" in data:
        return "native"
    if "architectures" in data or data.get("model_type") == "llama":
        return "reference"
    raise CheckpointError(f"{config} has neither 'kind' (calmlm format) nor 'architectures' (reference format); "
                          "it is not a config calmlm can read")


def load_tokenizer_from(directory: Path, model: nn.Module | None = None) -> Any:
    """The tokenizer saved beside the weights, or None.

    The reference sets vocab_size = len(tokenizer) after adding a [PAD] token, so a Llama 3 tokenizer (128256
    ids) and the weights (128256 or 128257 rows) may differ by that token. A smaller tokenizer is fine; a larger
    one is accepted with a warning when the ids beyond the model's vocabulary are only added special tokens
    (text never encodes to them), and refused otherwise."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from .tokenizer import Tokenizer, check_vocab

    tokenizer = Tokenizer.load(directory)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        added = tokenizer.backend.get_added_tokens_decoder()
        extra = range(vocab, tokenizer.vocab_size)
        if all(i in added and added[i].special for i in extra):
            warnings.warn(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}; "
                          f"ids {vocab}..{tokenizer.vocab_size - 1} are special tokens "
                          f"({', '.join(added[i].content for i in extra)}) the model never reads or writes",
                          stacklevel=3)
        else:
            check_vocab(tokenizer, vocab)
    return tokenizer
