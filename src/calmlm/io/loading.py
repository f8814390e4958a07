"""``calmlm.load``: one entry point for every checkpoint calmlm can read.

* a local folder in calmlm's native format (``config.json`` with ``"kind"`` + safetensors);
* a local folder in the CALM reference format (``config.json`` with ``"architectures"`` + ``pytorch_model.bin``
  or safetensors, possibly sharded), translated by :mod:`calmlm.io.reference`;
* a Hugging Face repository id (``cccczshao/CALM-M``), downloaded with ``huggingface_hub.snapshot_download``
  (only the config, weight and tokenizer files) and then read as above.

Both formats go through :func:`build`: the model is built on the meta device, every key and shape is checked
before a tensor is read, shards are read one at a time and their memory-mapped tensors assigned (with
``dtype=None`` on CPU the parameters *are* the file pages), tied weights are re-tied and RoPE buffers recomputed.
The returned model (eval mode) carries its tokenizer (or None) as ``model.tokenizer``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import KIND_NAMES, WeightFiles, model_config, native_weights, read_json
from .reference import translate
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError, TokenizerError

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
    if kind is not None and kind not in KIND_NAMES:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {sorted(KIND_NAMES)}")
    directory = resolve(path_or_repo_id, revision)
    if detect_format(directory) == "native":
        model = load_model(directory, device=device, dtype=dtype, expect=kind)
    else:
        model = load_reference(directory, device=device, dtype=dtype, autoencoder=autoencoder)
        if kind is not None and model.config.kind != kind:
            raise CheckpointError(f"{path_or_repo_id} holds a {model.config.kind} model (reference format), expected "
                                  f"a {kind}; pass the right checkpoint")
    model.tokenizer = load_tokenizer_from(directory, model) if load_tokenizer else None
    return model


def load_with_tokenizer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        tokenizer: str | Path | None = None, *, purpose: str | None = None, kind: str | None = None,
                        autoencoder: str | Path | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer): :func:`load`, with the tokenizer of ``tokenizer`` (a file or folder,
    checked against the model's vocabulary) or else the one saved with the model. ``purpose`` (e.g.
    "generation"): refuse an autoencoder, naming what needs a language model; ``kind``: refuse another kind."""
    from ..data.tokenizer import Tokenizer, check_vocab

    model = load(path, device=device, dtype=dtype, kind=kind, autoencoder=autoencoder)
    if purpose is not None and model.config.kind == "autoencoder":
        raise ConfigError(f"{path} is an autoencoder; {purpose} needs a CALM or baseline model (use `calm eval-ae` "
                          "for autoencoders)")
    tok = model.tokenizer
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
        check_vocab(tok, model.config.vocab_size)
    if tok is None:
        raise TokenizerError(f"{path} holds no tokenizer; pass --tokenizer PATH (tokenizer.json or tokenizer.model, "
                             "the tokenizer the model was trained with)")
    return model, tok


def load_model_and_tokenizer(path: str, device: str | None = None, tokenizer: str | None = None,
                             dtype_name: str = "auto", purpose: str | None = None,
                             kind: str | None = None) -> tuple[Any, Any]:
    """:func:`load_with_tokenizer` with the commands' defaults: ``device`` None or "auto" = CUDA, else MPS, else
    the CPU; ``dtype_name`` "stored", "auto" (bfloat16 on GPUs, the stored dtype on CPU) or a torch dtype."""
    device = str(resolve_device(device))
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.startswith("cuda") else "stored"
    dtype = None if dtype_name == "stored" else getattr(torch, dtype_name)
    return load_with_tokenizer(path, device, dtype, tokenizer, purpose=purpose, kind=kind)


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


def load_tokenizer_from(directory: Path, model: nn.Module) -> Any:
    """The tokenizer saved beside the weights, or None.

    The reference sets vocab_size = len(tokenizer) after adding a [PAD] token, so a Llama 3 tokenizer (128256
    ids) and the weights (128256 or 128257 rows) may differ by that token. A smaller tokenizer is fine; a larger
    one is accepted with a warning when the ids beyond the model's vocabulary are only added special tokens
    (text never encodes to them), and refused otherwise."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from ..data.tokenizer import Tokenizer, check_vocab

    tokenizer = Tokenizer.load(directory)
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
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


# -- building a model from its weights -------------------------------------------------------------------

def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               expect: str | None = None) -> nn.Module:
    """A native checkpoint folder -> its model (eval mode); ``expect`` (a kind) rejects another kind."""
    directory = Path(directory).expanduser()
    config = model_config(directory, expect)
    files = native_weights(directory)
    return build(config, files, {k: k for k in files.shapes()}, str(directory), device, dtype)


def load_reference(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   autoencoder: str | Path | Any = None) -> nn.Module:
    """A reference-format folder -> Autoencoder, CALM or BaselineLM (eval mode); see :func:`calmlm.io.reference.
    translate` for ``autoencoder``."""
    t = translate(directory, autoencoder)
    ae = None
    if t.autoencoder_dir is not None:  # a CALM folder without ae_model.* weights
        ae = load(t.autoencoder_dir, device=device, dtype=dtype, kind="autoencoder", load_tokenizer=False)
    return build(t.config, t.files, t.rename, str(directory), device, dtype, autoencoder=ae)


def unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor once, under its first name, and {alias: first name} for tied ones."""
    first: dict[int, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            unique[name] = t
    return unique, aliases


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str,
               rename: dict[str, str] | None = None, skip: str | None = None) -> None:
    """Strict key and shape check of stored ``shapes`` (renamed by ``rename``) against ``model``, before any
    tensor is read; tied aliases may be absent, ``skip`` is a prefix of weights that come from elsewhere."""
    expected, aliases = unique_tensors(model)
    if skip is not None:
        expected = {k: v for k, v in expected.items() if not k.startswith(skip)}
    found: set[str] = set()
    unexpected, mismatched = [], []
    for key, shape in shapes.items():
        name = (rename or {}).get(key, key)
        name = aliases.get(name, name)
        found.add(name)
        shown = key if name == key else f"{key} (-> {name})"
        if name not in expected:
            unexpected.append(shown)
        elif tuple(shape) != tuple(expected[name].shape):
            mismatched.append(f"{shown}: checkpoint {tuple(shape)} vs model {tuple(expected[name].shape)}")
    problems = [f"{what} {_summarise(keys, limit)}" for what, keys, limit in (
        ("missing keys", sorted(set(expected) - found), 5), ("unexpected keys", sorted(unexpected), 5),
        ("shape mismatches", mismatched, 3)) if keys]
    if problems:
        raise CheckpointError(f"the weights in {where} do not match the {type(model).__name__} model of its config: "
                              + "; ".join(problems) + ". config.json does not describe these weights (another model "
                              "version, an edited config.json or an incomplete download); fix config.json, re-save or "
                              "re-download the checkpoint")


def full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state`` checked against ``model`` (see :func:`check_keys`), with absent tied aliases filled in."""
    check_keys(model, {k: tuple(v.shape) for k, v in state.items()}, where)
    _, aliases = unique_tensors(model)
    full = dict(state)
    for alias, name in aliases.items():
        tensor = full.get(name, full.get(alias))
        full.setdefault(name, tensor)
        full.setdefault(alias, tensor)
    return full


def build(config: Any, files: WeightFiles, rename: dict[str, str], where: str, device: str | torch.device = "cpu",
          dtype: torch.dtype | None = None, autoencoder: nn.Module | None = None) -> nn.Module:
    """The model of ``config`` with the weights of ``files`` (stored key -> calmlm key by ``rename``), eval mode.

    ``autoencoder``: a loaded autoencoder to put in a CALM whose folder holds none. Several stored keys may
    name one tensor (tied weights, reference aliases): their values must agree, and one copy is kept."""
    from ..models.transformer import RotaryEmbedding
    from ..models import build_model

    with torch.device("meta"):  # no allocation: every tensor will be assigned from the files
        model = build_model(config)
    if autoencoder is not None:
        model.autoencoder = autoencoder
    check_keys(model, files.shapes(), where, rename, skip="autoencoder." if autoencoder is not None else None)
    _, aliases = unique_tensors(model)
    placed: dict[str, torch.Tensor] = {}
    for shard in files.iter_shards():
        batch: dict[str, torch.Tensor] = {}
        for key, tensor in shard.items():
            if key not in rename:
                continue  # a buffer calmlm recomputes
            target = aliases.get(rename[key], rename[key])
            if target in placed:
                prev = placed[target]
                if not (tensor.data_ptr() == prev.data_ptr() or torch.equal(tensor.to(prev.device, prev.dtype), prev)):
                    raise CheckpointError(f"{where}: {key!r} should be an alias of the tensor loaded as {target!r} "
                                          "but the values differ; the checkpoint is inconsistent")
                continue
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            placed[target] = batch[target] = tensor.to(device)
        model.load_state_dict(batch, strict=False, assign=True)
        del shard, batch  # drop this shard's mapping before the next one is opened
    for alias, name in aliases.items():  # assign replaced the shared Parameter: point the aliases at it again
        module_name, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, model.get_parameter(name))
    for module in model.modules():  # non-persistent buffers are not in the files: recompute them
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(2 * module.inv_freq.shape[0], config.rope_theta).inv_freq
            module.register_buffer("inv_freq", fresh.to(device), persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after check_keys, but a meta tensor would fail much later and obscurely
        raise CheckpointError(f"internal error: tensors {left[:5]} of {where} were not loaded; please report this")
    if hasattr(model, "autoencoder"):  # CALM: the autoencoder stays frozen
        model.autoencoder.requires_grad_(False)
    return model.eval()
