"""Tokenizers: a thin wrapper over Hugging Face ``tokenizers``, a Llama 3 loader and a BPE trainer.

Formats ``Tokenizer.load`` accepts (a directory holding one of them, or the file itself):

* ``tokenizer.json`` — the Hugging Face fast-tokenizer format, used as is.
* ``tokenizer.model`` in tiktoken format (the Llama 3 release): one line ``<base64 of the token's bytes> <rank>``
  per token, rank = token id, plus an optional ``tokenizer_config.json`` whose ``added_tokens_decoder`` lists
  the special tokens with their ids. It is rebuilt as an equivalent ``tokenizers`` byte-level BPE:

  - vocabulary: each token's bytes mapped to GPT-2's byte-level unicode alphabet, id = rank;
  - merges ("BPE recovery", as the transformers converter does): every split of a multi-byte token into two
    tokens is a merge, ordered by the merged token's rank, which reproduces tiktoken's lowest-rank-first
    merging; ``ignore_merges`` maps a pre-token that is itself a token straight to it, as tiktoken does;
  - pre-tokenizer: ``Split`` with the Llama 3 pattern ``LLAMA3_PATTERN`` (behaviour "isolated"), then
    ``ByteLevel(add_prefix_space=False, use_regex=False)``;
  - decoder: ``ByteLevel``; special tokens are added with their ids (128000..128255 for Llama 3).

``encode`` adds no BOS/EOS: the data pipeline appends EOS after each document itself. Special tokens
written in the text are recognised by default (``allow_special=False`` treats them as plain text, which
is how corpora are tokenised so that text never produces a special id such as the pad id 0).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from contextlib import suppress
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from ..errors import TokenizerError

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TRAINED_SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
CONFIG_FILE = "tokenizer_config.json"
_ROLE_GUESSES = (  # bos, eos, pad names recognised when a tokenizer comes without a config
    ("<bos>", "<|begin_of_text|>", "<s>", "<|startoftext|>"),
    ("<eos>", "<|end_of_text|>", "</s>", "<|endoftext|>"),
    ("<pad>", "[PAD]", "<|pad|>"),
)


class Tokenizer:
    """Text <-> token ids. Wraps a ``tokenizers.Tokenizer`` and remembers which tokens are BOS/EOS/pad."""

    def __init__(self, backend: Any, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name, token in zip(("bos_token", "eos_token", "pad_token"), (bos_token, eos_token, pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{name} {token!r} is not in the tokenizer's vocabulary; "
                                     f"fix {CONFIG_FILE} or pass a token that exists")
        self.chat_template: str | None = None  # Jinja template of tokenizer_config.json, kept through save/load

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        self.backend.encode_special_tokens = not allow_special
        try:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        finally:
            self.backend.encode_special_tokens = False
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's vocab_size must be at least this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @cached_property
    def hash(self) -> str:
        """sha256 of the serialised tokenizer and its special-token roles: a cache key for token files."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(json.dumps([self.bos_token, self.eos_token, self.pad_token]).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r})")

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` (HF format) and ``tokenizer_config.json`` naming bos/eos/pad."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` or a tiktoken ``tokenizer.model`` from a file or directory; a name that is
        not a local path is fetched from the Hugging Face Hub (``tokenizer.json`` of that repository)."""
        path = Path(path).expanduser()
        if path.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (path / name).is_file():
                    return cls.load(path / name)
            raise TokenizerError(f"{path} holds neither tokenizer.json nor tokenizer.model; pass the "
                                 "directory a tokenizer was saved to (calm tokenizer train --out DIR)")
        if not path.exists():
            if _looks_like_hub_name(str(path)):
                return cls.load(_hub_download(str(path)))
            raise TokenizerError(f"no tokenizer file at {path}; pass a tokenizer.json / tokenizer.model "
                                 "file or its directory, or train one with `calm tokenizer train`")
        config = read_tokenizer_config(path.parent)
        backend = _load_hf_json(path) if path.suffix == ".json" else _load_tiktoken(path, config)
        roles = [_token_name(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")]
        if not config:  # no config file at all: recognise the usual names
            vocab = backend.get_vocab(with_added_tokens=True)
            roles = [next((g for g in guesses if g in vocab), None) for guesses in _ROLE_GUESSES]
        tok = cls(backend, *roles)
        template = config.get("chat_template")
        tok.chat_template = template if isinstance(template, str) else None
        return tok


def _token_name(value: Any) -> str | None:
    """A tokenizer_config entry is either the token string or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """A tokenizer folder's special_tokens_map.json and tokenizer_config.json, merged (the latter wins)."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):  # the latter wins
        file = directory / name
        if file.is_file():
            try:
                config.update(json.loads(file.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{file} is not valid JSON ({e}); the file is corrupt, "
                                     "restore or delete it") from None
    return config


def _load_hf_json(path: Path) -> Any:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json ({e}); the file is corrupt "
                             "or of another format, re-download or re-train it") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # mapped, in order, to the characters from 256 on
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file: lines ``<base64 bytes> <rank>``."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} line {lineno} is not a tiktoken rank line '<base64> <rank>' ({e}); only "
                             "tiktoken-format tokenizer.model files are supported — for a SentencePiece model "
                             "pass its tokenizer.json instead") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    if not ranks:
        raise TokenizerError(f"{path} is empty; re-download the tokenizer")
    return ranks


def _load_tiktoken(path: Path, config: dict[str, Any]) -> Any:
    ranks = read_tiktoken_ranks(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not the ids 0..{len(ranks) - 1} exactly once each; "
                             "the file is corrupt, re-download it")
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], to_str(left), to_str(right)))
    merges.sort()  # by merged rank, then by the left part's rank: the order tiktoken applies merges in
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for _, _, left, right in merges],
                                              ignore_merges=True))
    _byte_level_llama3(backend)
    try:
        specials = sorted((int(i), entry["content"]) for i, entry in config.get("added_tokens_decoder", {}).items())
    except (AttributeError, KeyError, TypeError, ValueError):
        raise TokenizerError(f"{path.parent / CONFIG_FILE}: added_tokens_decoder must map ids to "
                             "{'content': token}; the file is corrupt") from None
    for token_id, content in specials:
        next_id = backend.get_vocab_size(with_added_tokens=True)
        if token_id != next_id:
            raise TokenizerError(f"{path.parent / CONFIG_FILE}: special token {content!r} has id {token_id}, "
                                 f"but the next free id is {next_id}; special ids must follow the rank file "
                                 "without gaps")
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    return backend


def _byte_level_llama3(backend: Any) -> None:
    """Llama 3 pre-tokenisation (its regex, then bytes as characters) and the byte-level decoder."""
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(repo_id, "tokenizer.json"))
    except Exception as e:  # offline, unknown repository, gated model...
        raise TokenizerError(f"no local tokenizer at {repo_id!r} and downloading tokenizer.json from the "
                             f"Hugging Face Hub failed ({type(e).__name__}); check the path, or log in / go "
                             "online for a Hub repository") from None
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        with suppress(Exception):  # optional: bos/eos names are then guessed
            hf_hub_download(repo_id, extra)
    return file


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE (Llama 3 pre-tokenisation) with ``<pad>``=0, ``<bos>``=1, ``<eos>``=2.

    Deterministic for the same texts in the same order. Every byte is in the vocabulary, so any text
    encodes; the result may be smaller than ``vocab_size`` on a tiny corpus.
    """
    if vocab_size < len(TRAINED_SPECIALS) + 256:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens "
                             f"plus {len(TRAINED_SPECIALS)} specials; use at least {256 + len(TRAINED_SPECIALS)}")
    backend = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    _byte_level_llama3(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    nonempty = (text for text in texts if text)
    first = next(nonempty, None)
    if first is None:
        raise TokenizerError("cannot train a tokenizer on an empty corpus; pass --data with some text")
    backend.train_from_iterator(itertools.chain([first], nonempty), trainer=trainer)
    return Tokenizer(backend, *TRAINED_SPECIALS[1:], pad_token=TRAINED_SPECIALS[0])


def check_vocab(tokenizer: Tokenizer, vocab_size: int, what: str = "model") -> None:
    """Refuse a tokenizer whose ids would not fit the embedding table of a ``vocab_size`` model."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the {what} has vocab_size {vocab_size}, so "
            f"token ids would be out of range; build the {what} with vocab_size >= {tokenizer.vocab_size} "
            f"or use the tokenizer it was trained with")
