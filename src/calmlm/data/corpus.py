"""Corpora, train/validation splits, memory-mapped token files and a resumable, DDP-aware block sampler.

Data specs (``--data``), resolved by ``open_corpus``:

* ``None`` — the default corpus: every ``*.py`` file of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), one document per file, skipping the folders in ``STDLIB_EXCLUDED_DIRS``
  (site-packages, tests, ``__pycache__``): about 12 MB, a few million tokens, on every machine with no download.
* a file: ``.jsonl``/``.json``/``.ndjson`` are JSON Lines (one object per line, its ``text`` field is a
  document; a bare string line is a document) or one JSON array of such objects/strings; ``.parquet`` is read
  through ``datasets``; any other file is UTF-8 text and one document.
* a directory: a ``datasets`` ``save_to_disk`` folder is loaded with ``load_from_disk``; otherwise every file
  below it (sorted, hidden entries skipped) whose extension is in ``READ_EXTENSIONS``, each read as above.
* a glob (``data/*.txt``, ``**`` allowed): the matching files, each read as above.
* ``hf:NAME[:CONFIG][@SPLIT]``, or a name that is not a local path (``wikitext``, ``org/name``): a Hugging Face
  dataset streamed with ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`` (split defaults
  to ``train``). ``PATH@SPLIT`` picks a split of a local ``save_to_disk`` DatasetDict.

A directory or glob skips the files that are not UTF-8 or cannot be read, with one warning (a ``CalmWarning``)
naming them; it is an error when none can be read. A single file that cannot be read is an error.

Empty documents are skipped. Without separate validation data, documents are split deterministically: a
document is in validation when a hash of the seed and its text falls below ``val_fraction``, so the split
depends only on the content, never on listing order, and duplicated documents land on the same side. If a
side gets less than one block, the last ``val_fraction`` of the blocks is held out instead (``info["split"]``).

Token files: a flat ``uint16`` (vocabulary <= 65536) or ``uint32`` array, every document followed by EOS,
written to a temporary file then renamed, with a JSON meta beside it (``<file>.json``: dtype, num_tokens,
tokenizer hash, source). ``prepare_corpus`` caches them under ``cache_dir/<key>/`` where the key hashes the
tokenizer, the source (paths, sizes, mtimes and permissions of local files), the split fraction and seed, so a
changed tokenizer or corpus rebuilds and an unchanged one is reused. The meta lists the files skipped as
unreadable; a reused cache repeats their warning, and fixing such a file changes the key, so it is then read.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..errors import CalmWarning, DataError, TokenizerError
from .tokenizer import Tokenizer

TEXT_EXTENSIONS = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".html", ".htm", ".xml", ".csv", ".tsv",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh",
    ".yaml", ".yml", ".toml", ".ini", ".cfg",
})
JSON_EXTENSIONS = frozenset({".jsonl", ".json", ".ndjson"})
READ_EXTENSIONS = TEXT_EXTENSIONS | JSON_EXTENSIONS | {".parquet"}  # the files a directory spec reads
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
TOKEN_FORMAT = 1  # bump when the token-file layout changes, so old caches are rebuilt
_ENCODE_BATCH_CHARS = 1 << 20  # tokenise about 1 MB of text per encode_batch call
_NAMED_FILES = 5  # unreadable files a message names before "and N more"


@dataclass
class Corpus:
    """A re-iterable source of documents. ``fingerprint`` changes whenever the content may have changed.
    ``skipped``: the ``(path, reason)`` of the files the last complete pass left out as unreadable."""

    description: str
    fingerprint: str
    documents: Callable[[], Iterator[str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        return filter(None, self.documents())  # empty documents are skipped

    def note_skipped(self, skipped: Iterable[Sequence[str]]) -> None:
        """Record the files a pass (or the cached token files built by one) left out; warns once per new list,
        so a corpus read twice, or a reused cache, gives one warning."""
        skipped = [(str(path), str(reason)) for path, reason in skipped]
        if skipped and skipped != self.skipped:
            warnings.warn(f"skipped {len(skipped)} of the {self.description} that cannot be read as UTF-8 text: "
                          f"{_name_files(skipped)}; convert them to UTF-8 or make them readable to include them",
                          CalmWarning, stacklevel=1)  # one location: Python shows a repeated warning once
        self.skipped = skipped


def _name_files(files: Sequence[tuple[str, str]]) -> str:
    named = ", ".join(f"{path} ({reason})" for path, reason in files[:_NAMED_FILES])
    return named + (f" and {len(files) - _NAMED_FILES} more" if len(files) > _NAMED_FILES else "")


# -- sources ---------------------------------------------------------------------------------------------

def open_corpus(spec: str | None, text_field: str = "text") -> Corpus:
    """Resolve a ``--data`` spec (see the module docstring) to a corpus; ``None`` is the default corpus."""
    if spec is None:
        return stdlib_corpus()
    if spec.startswith("hf:"):
        return _hf_corpus(*_parse_hf(spec[3:]), text_field)
    path = Path(spec).expanduser()
    if path.is_file():
        return _files_corpus([path], path.parent, f"file {path}", text_field)
    if path.is_dir():
        return _dir_corpus(path, text_field, split=None)
    base, at, split = spec.rpartition("@")
    if at and Path(base).expanduser().is_dir():  # PATH@SPLIT
        return _dir_corpus(Path(base).expanduser(), text_field, split=split)
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"the pattern {spec!r} matches no files; check the pattern (quote it so the shell "
                            "does not expand it)")
        return _files_corpus(files, Path(os.path.commonpath([str(f.parent) for f in files])),
                             f"{len(files)} files matching {spec}", text_field)
    if _looks_local(spec):
        raise DataError(f"no such file or directory: {spec}; pass an existing file, directory or glob, "
                        "or hf:NAME for a Hugging Face dataset")
    return _hf_corpus(*_parse_hf(spec), text_field, maybe_path=True)


def stdlib_corpus() -> Corpus:
    """The default corpus: the running interpreter's standard-library ``*.py`` files, one document each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort()
    if not files:
        raise DataError(f"the default corpus is empty: no *.py files under {root} (a stripped Python install?); "
                        "pass --data with your own text")
    version = ".".join(map(str, sys.version_info[:3]))
    # a few stdlib files may use a legacy encoding; replacing bad bytes keeps the default corpus usable
    return Corpus(f"Python {version} standard library ({len(files)} files under {root})",
                  _stat_fingerprint(files, root, "stdlib"),
                  lambda: (f.read_bytes().decode("utf-8", errors="replace") for f in files))


def _looks_local(spec: str) -> bool:
    """A spec that cannot be a Hugging Face dataset name, so a missing path is reported as missing."""
    return (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
            or Path(spec).suffix.lower() in READ_EXTENSIONS)


def _parse_hf(rest: str) -> tuple[str, str | None, str]:
    split = "train"
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    name, _, config = rest.partition(":")
    if not name:
        raise DataError("empty Hugging Face dataset name; use hf:NAME[:CONFIG][@SPLIT], e.g. "
                        "hf:wikitext:wikitext-103-raw-v1@train")
    return name, config or None, split


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the `datasets` package, which is not installed; "
                        "install it with: pip install calmlm[datasets]") from None
    return datasets


def _hf_corpus(name: str, config: str | None, split: str, text_field: str, maybe_path: bool = False) -> Corpus:
    datasets = _import_datasets(f"the Hugging Face dataset {name!r}")
    label = name + (f":{config}" if config else "") + f"@{split}"

    def documents() -> Iterator[str]:
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # offline, unknown name, unknown config/split...
            hint = f"no local file or directory {name!r}, and " if maybe_path else ""
            raise DataError(f"{hint}loading the Hugging Face dataset {label} failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); check the name, config and split "
                            "and that you are online (or use a local file)") from None
        yield from _rows_text(ds, text_field, f"dataset {label}")

    return Corpus(f"Hugging Face dataset {label}", f"hf:{label}:{text_field}", documents)


def _rows_text(rows: Iterable[Any], text_field: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if text_field not in row:
            raise DataError(f"{where} row {i} has no {text_field!r} field (fields: {sorted(row)}); "
                            "pass the name of the text column (--text-field)")
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{where} row {i}: field {text_field!r} is {type(text).__name__}, not text; "
                            "pass the name of a text column (--text-field)")
        yield text or ""


def _dir_corpus(path: Path, text_field: str, split: str | None) -> Corpus:
    if (path / "dataset_dict.json").is_file() or (
            (path / "state.json").is_file() and (path / "dataset_info.json").is_file()):  # a save_to_disk folder
        return _saved_dataset_corpus(path, text_field, split)
    if split is not None:
        raise DataError(f"{path} is not a `datasets` save_to_disk folder, so @{split} cannot pick a split; "
                        "drop the @SPLIT suffix")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in READ_EXTENSIONS]
    if not files:
        raise DataError(f"the directory {path} holds no text files (extensions read: "
                        f"{' '.join(sorted(READ_EXTENSIONS))}); put documents there or pass another --data")
    return _files_corpus(sorted(files), path, f"{len(files)} files under {path}", text_field)


def _saved_dataset_corpus(path: Path, text_field: str, split: str | None) -> Corpus:
    datasets = _import_datasets(f"the saved dataset {path}")

    def documents() -> Iterator[str]:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"cannot load the saved dataset {path} ({type(e).__name__}: {e}); "
                            "re-save it with Dataset.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            name = split or "train"
            if name not in ds:
                raise DataError(f"the saved dataset {path} has no split {name!r} (splits: {sorted(ds)}); "
                                f"pick one with {path}@SPLIT")
            ds = ds[name]
        yield from _rows_text(ds, text_field, f"dataset {path}")

    files = sorted(p for p in path.rglob("*") if p.is_file())
    return Corpus(f"saved dataset {path}" + (f"@{split}" if split else ""),
                  _stat_fingerprint(files, path, f"saved:{split}:{text_field}"), documents)


def _files_corpus(files: Sequence[Path], root: Path, description: str, text_field: str) -> Corpus:
    """Documents of local files. Of several files, those that cannot be read as UTF-8 text are skipped (the
    corpus's ``note_skipped`` warns); a single such file, or all of them, is an error."""
    def documents() -> Iterator[str]:
        skipped = []
        for f in files:
            suffix = f.suffix.lower()
            if suffix == ".parquet":
                ds = _import_datasets(f"the parquet file {f}").load_dataset(
                    "parquet", data_files=[str(f)], split="train", streaming=True)
                yield from _rows_text(ds, text_field, f"parquet file {f}")
                continue
            try:
                text = _read_text(f)
            except _Unreadable as e:
                if len(files) == 1:
                    raise DataError(f"cannot read {f} as UTF-8 text ({e.reason}); {e.fix}") from None
                skipped.append((str(f), e.reason))
                continue
            if suffix in JSON_EXTENSIONS:
                yield from _json_docs(text, f, text_field)
            else:
                yield text
        if skipped and len(skipped) == len(files):
            raise DataError(f"none of the {description} can be read as UTF-8 text: {_name_files(skipped)}; "
                            "convert them to UTF-8 or make them readable, or pass another --data")
        corpus.note_skipped(skipped)

    corpus = Corpus(description, _stat_fingerprint(files, root, f"files:{text_field}"), documents)
    return corpus


class _Unreadable(Exception):
    """A file that is not UTF-8 text or cannot be read: a short ``reason`` and the ``fix``."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Unreadable(f"not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}",
                          "convert it to UTF-8 or remove it from the corpus") from None
    except OSError as e:
        raise _Unreadable(e.strerror or type(e).__name__, "check that it exists and is readable") from None


def _json_docs(text: str, path: Path, text_field: str) -> Iterator[str]:
    """The documents of a JSON Lines or JSON array file's ``text``."""
    if text.lstrip().startswith("["):  # one JSON array rather than JSON Lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); fix the file or remove it from the corpus") from None
        lines: Iterable[tuple[int, Any]] = enumerate(rows, 1)
        unit = "item"
    else:
        lines = ((n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip())
        unit = "line"
    for n, item in lines:
        if unit == "line":
            try:
                item = json.loads(item)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not valid JSON ({e.msg}); JSON Lines files need one JSON "
                                "object per line — fix the line or remove the file from the corpus") from None
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict) and isinstance(item.get(text_field), str):
            yield item[text_field]
        elif isinstance(item, dict) and item.get(text_field, "") is None:
            continue
        else:
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(f"{path} {unit} {n} has no text field {text_field!r} (found: {found}); pass the name "
                            "of the text field (--text-field) or fix the file")


def _stat_fingerprint(files: Sequence[Path], root: Path, tag: str) -> str:
    """Cheap content fingerprint: relative paths, sizes, modification times and permissions of every file (the
    permissions, so that making a skipped file readable changes it), or the error of a file that cannot be stat'ed."""
    h = hashlib.sha256(tag.encode())
    for f in files:
        try:
            st = f.stat()
            state = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode:o}"
        except OSError as e:  # e.g. a dangling symlink: read (and skipped) later
            state = f"error {e.errno}"
        h.update(f"{os.path.relpath(f, root)}\0{state}\n".encode())
    return f"{tag}:{h.hexdigest()}"


# -- splits ----------------------------------------------------------------------------------------------

def is_validation(text: str, seed: int, val_fraction: float) -> bool:
    """Whether a document belongs to validation: a hash of (seed, text) below ``val_fraction``."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def split_documents(docs: Iterable[str], seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """In-memory deterministic split (``prepare_corpus`` streams the same rule instead)."""
    train, val = [], []
    for doc in docs:
        (val if is_validation(doc, seed, val_fraction) else train).append(doc)
    return train, val


# -- token files -----------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(_meta_path(path).read_text())
        size = path.stat().st_size
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or size != meta.get("num_tokens", -1) * np.dtype(meta.get("dtype", "u1")).itemsize:
        return None  # interrupted or truncated: rebuild
    return meta


def _reusable(path: Path, tokenizer: Tokenizer, source: str) -> dict[str, Any] | None:
    """The meta of the complete token file at ``path`` if ``tokenizer`` built it from ``source``, else None."""
    meta = _read_meta(path)
    built_by = meta and (meta.get("format"), meta.get("tokenizer"), meta.get("source"))
    return meta if built_by == (TOKEN_FORMAT, tokenizer.hash, source) else None


class _TokenWriter:
    """Appends token arrays to a temporary file; ``commit`` renames it into place, then writes the meta. A write
    that fails (a full disk...) raises a ``DataError`` naming the cache."""

    def __init__(self, path: Path, tokenizer: Tokenizer, source: str) -> None:
        self.path, self.source, self.tokenizer = path, source, tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "wb")
        except OSError as e:
            raise self._failed(e) from None
        self.num_tokens = self.num_documents = 0

    def write(self, ids: list[int]) -> None:
        try:
            self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        except OSError as e:
            raise self._failed(e) from None
        self.num_tokens += len(ids)
        self.num_documents += 1

    def commit(self, skipped: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        meta = {"format": TOKEN_FORMAT, "dtype": self.dtype.name, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "eos_id": self.tokenizer.eos_id,
                "vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.hash, "source": self.source,
                "skipped": [list(s) for s in skipped]}
        try:
            self.file.close()
            os.replace(self.tmp, self.path)
            _meta_path(self.tmp).write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(_meta_path(self.tmp), _meta_path(self.path))
        except OSError as e:
            raise self._failed(e) from None
        return meta

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        _meta_path(self.tmp).unlink(missing_ok=True)

    def _failed(self, e: OSError) -> DataError:
        return DataError(f"writing the token cache {self.path} failed ({e.strerror or e}); free some disk space "
                         "or pass another --cache-dir")


def _text_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """The non-empty documents, in batches of about ``_ENCODE_BATCH_CHARS`` characters."""
    batch: list[str] = []
    chars = 0
    for doc in filter(None, docs):
        batch.append(doc)
        chars += len(doc)
        if chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_token_files(docs: Iterable[str], tokenizer: Tokenizer, description: str,
                       outputs: Sequence[tuple[Path, str]],
                       route: Callable[[str], int] = lambda doc: 0) -> dict[str, Any]:
    """Tokenise ``docs`` in one pass (a streamed dataset is read only once) into the token files ``outputs``,
    ``(path, source)`` pairs, the ``route(doc)``-th getting each document; returns the first file's meta (which
    lists the files a ``Corpus`` skipped)."""
    eos = tokenizer.eos_id
    if eos is None:
        raise TokenizerError(f"{tokenizer!r} has no EOS token to separate documents; name one as eos_token "
                             "in its tokenizer_config.json")
    writers: list[_TokenWriter] = []
    try:
        for path, source in outputs:
            writers.append(_TokenWriter(path, tokenizer, source))
        for batch in _text_batches(docs):
            # allow_special=False: text that spells a special token (e.g. "<pad>") never yields its id
            for doc, ids in zip(batch, tokenizer.encode_batch(batch, allow_special=False)):
                ids.append(eos)
                writers[route(doc)].write(ids)
        if not any(w.num_documents for w in writers):
            raise DataError(f"the corpus {description} contains no text (no non-empty documents); "
                            "pass --data with some text")
        skipped = docs.skipped if isinstance(docs, Corpus) else []
        for w in reversed(writers):  # the first last: a cache counts as complete only once its meta exists
            meta = w.commit(skipped)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return meta


def build_token_file(docs: Iterable[str], tokenizer: Tokenizer, path: str | Path, source: str = "") -> dict[str, Any]:
    """Tokenise ``docs`` into a flat token file (EOS after each document); returns its meta.

    If ``path`` already holds a complete file for the same tokenizer and ``source`` it is reused and
    ``docs`` is not read (``meta["reused"]`` is True; a ``Corpus`` is told the files its build skipped).
    Pass a ``source`` that changes with the content.
    """
    path = Path(path)
    if meta := _reusable(path, tokenizer, source):
        if isinstance(docs, Corpus):
            docs.note_skipped(meta.get("skipped", []))
        return {**meta, "reused": True}
    return {**_write_token_files(docs, tokenizer, source or str(path), [(path, source)]), "reused": False}


class TokenDataset:
    """Non-overlapping blocks of ``block_size`` tokens of a token file, read through ``numpy.memmap``.

    ``block_range=(start, stop)`` restricts it to those blocks (used to hold out a tail for validation).
    """

    def __init__(self, path: str | Path, block_size: int, block_range: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        if block_size <= 0:
            raise DataError(f"block_size must be positive, got {block_size}")
        meta = _read_meta(self.path)
        if meta is None:
            raise DataError(f"{self.path} is not a complete token file (missing or mismatched "
                            f"{_meta_path(self.path).name}); "
                            "rebuild it with build_token_file / prepare_corpus (delete the cache folder)")
        self.meta, self.block_size = meta, block_size
        self.num_tokens = int(meta["num_tokens"])
        total = self.num_tokens // block_size
        self.start, stop = block_range if block_range is not None else (0, total)
        if not 0 <= self.start <= stop <= total:
            raise DataError(f"block range {block_range} is outside the {total} blocks of {self.path}")
        self.num_blocks = stop - self.start
        self._open()

    def _open(self) -> None:
        dtype = np.dtype(self.meta["dtype"])
        # np.memmap cannot map an empty file
        self.tokens = (np.memmap(self.path, dtype=dtype, mode="r", shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, dtype=dtype))

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: reopen the map instead of copying it
        return {key: value for key, value in self.__dict__.items() if key != "tokens"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for {self.num_blocks} blocks")
        start = (self.start + i % self.num_blocks) * self.block_size
        return torch.from_numpy(self.tokens[start:start + self.block_size].astype(np.int64))  # (T,)

    def recut(self, block_size: int) -> TokenDataset:
        """The whole blocks of ``block_size`` tokens inside this dataset's tokens (same file)."""
        start, end = self.start * self.block_size, (self.start + self.num_blocks) * self.block_size
        first, last = -(-start // block_size), end // block_size
        return TokenDataset(self.path, block_size, (first, max(first, last)))

    def __repr__(self) -> str:
        return f"TokenDataset({self.path}, block_size={self.block_size}, num_blocks={self.num_blocks})"


# -- the one input type of evaluation (and of the trainer's batches) -------------------------------------------

Blocks = Union[TokenDataset, Sequence[torch.Tensor], torch.Tensor]  # anything with len and [i] -> (L,) ids


def token_blocks(data: Blocks, block_size: int | None = None) -> tuple[Blocks, int]:
    """Evaluation data checked once: ``(blocks, L)``. ``data`` is a dataset of (L,) blocks (a TokenDataset,
    or anything with ``len`` and ``[i]``) or a token tensor (B, L); a TokenDataset or a tensor (also a flat
    (T,) stream) is re-cut when ``block_size`` differs, any other dataset must match it."""
    if torch.is_tensor(data):
        if data.dim() == 2 and block_size in (None, data.shape[1]):
            return data.long(), int(data.shape[1])
        if data.dim() not in (1, 2):
            raise DataError(f"token data must be (tokens,) or (blocks, block_size), got {tuple(data.shape)}")
        if block_size is None:
            raise DataError("a flat token stream needs block_size to be cut into blocks")
        n = data.numel() // block_size
        return data.reshape(-1)[:n * block_size].view(n, block_size).long(), block_size
    if isinstance(data, TokenDataset) and block_size not in (None, data.block_size):
        data = data.recut(block_size)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise DataError(f"evaluation data must be a token tensor (B, L) or a dataset of token blocks such as "
                        f"TokenDataset, got {type(data).__name__}")
    size = getattr(data, "block_size", None) or (len(data[0]) if len(data) else block_size or 0)
    if block_size is not None and size != block_size:
        raise DataError(f"the dataset's blocks hold {size} tokens but block_size={block_size} was asked; "
                        "pass block_size=None or a TokenDataset / token tensor to re-cut")
    return data, int(size)


def stack_blocks(blocks: Any, indices: Sequence[int]) -> Any:
    """The blocks at ``indices`` as one (B, L) int64 batch; blocks that are dicts of tensors (fine-tuning's
    ``{"input_ids", "loss_mask"}``) are stacked key by key into a dict of batches."""
    rows = [blocks[int(i)] for i in indices]
    if rows and isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack([torch.as_tensor(r) for r in rows]).long()


def iter_blocks(blocks: Blocks, batch_size: int, rank: int = 0, world_size: int = 1,
                max_blocks: int | None = None) -> Iterator[torch.Tensor]:
    """Evaluation order: (B, L) batches of the first ``max_blocks`` blocks, block i on rank i % world_size."""
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    mine = range(rank, n, world_size)
    for s in range(0, len(mine), batch_size):
        yield stack_blocks(blocks, mine[s:s + batch_size])


class BlockSampler:
    """Infinite iterator of per-rank batches of block indices, in a seeded permutation per epoch.

    Global batch ``g`` = ``batch_size * world_size``; each step takes the next ``g`` indices of the epoch's
    permutation and rank r gets rows ``[r*batch_size, (r+1)*batch_size)``, so N ranks see exactly the global
    batches one process with batch ``g`` sees. An epoch drops its last ``num_blocks % g`` blocks. The state
    (epoch, blocks consumed in it) is rank-independent; ``state_dict`` after n batches resumes at batch n+1.
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        if batch_size <= 0 or num_blocks < self.global_batch_size:
            raise DataError(f"{num_blocks} blocks cannot fill one global batch of {self.global_batch_size} "
                            f"({batch_size} per rank x {world_size} ranks); use more data, a smaller batch size "
                            "or a smaller block size")
        self.epoch = 0
        self.position = 0  # blocks of this epoch's permutation already consumed (all ranks together)
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)  # the permutation of _perm_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.num_blocks // self.global_batch_size

    def __iter__(self) -> BlockSampler:
        return self

    def __next__(self) -> list[int]:
        if self.position + self.global_batch_size > self.num_blocks:
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_blocks)
            self._perm_epoch = self.epoch
        rows = self._perm[self.position:self.position + self.global_batch_size]
        self.position += self.global_batch_size
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_blocks": self.num_blocks, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_blocks", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data order: the checkpoint has {key}={state[key]} but this run "
                                f"has {getattr(self, key)}; resume with the same data, block size, seed and "
                                "global batch size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# -- one call for the trainers ---------------------------------------------------------------------------

def prepare_corpus(data_spec: str | None, tokenizer: Tokenizer, cache_dir: str | Path, block_size: int,
                   val_fraction: float = 0.02, seed: int = 0, *, val_data: str | None = None,
                   text_field: str = "text") -> tuple[TokenDataset, TokenDataset | None, dict[str, Any]]:
    """Tokenise (or reuse from ``cache_dir``) a corpus and its validation split; returns (train, val, info).

    ``val_data`` gives separate validation data (then nothing is held out of ``data_spec``); with neither it
    and ``val_fraction == 0`` the returned val is None.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    corpus = open_corpus(data_spec, text_field)
    val_corpus = open_corpus(val_data, text_field) if val_data is not None else None
    split = [val_corpus.fingerprint] if val_corpus else [val_fraction, seed]
    key = hashlib.sha256(json.dumps([TOKEN_FORMAT, corpus.fingerprint, split, tokenizer.hash]).encode()).hexdigest()
    folder = Path(cache_dir).expanduser() / key[:16]
    train_path, val_path = folder / "train.tokens", folder / "val.tokens"
    train_source = f"{corpus.fingerprint} | train {split}"
    val_source = f"{val_corpus.fingerprint} | val" if val_corpus else f"{corpus.fingerprint} | val {split}"
    holdout = val_corpus is None and val_fraction > 0
    has_val = holdout or val_corpus is not None
    train_meta = _reusable(train_path, tokenizer, train_source)
    val_meta = _reusable(val_path, tokenizer, val_source) if has_val else {}
    reused = train_meta is not None and val_meta is not None
    if reused:  # the warning about the files the build skipped, again
        corpus.note_skipped(train_meta.get("skipped", []))  # type: ignore[union-attr]
        if val_corpus:
            val_corpus.note_skipped(val_meta.get("skipped", []))  # type: ignore[union-attr]
    else:
        if holdout:
            outputs = [(train_path, train_source), (val_path, val_source)]
            _write_token_files(corpus, tokenizer, corpus.description, outputs,
                               route=lambda doc: int(is_validation(doc, seed, val_fraction)))
        else:
            build_token_file(corpus, tokenizer, train_path, train_source)
            if val_corpus:
                build_token_file(val_corpus, tokenizer, val_path, val_source)

    train = TokenDataset(train_path, block_size)
    val = TokenDataset(val_path, block_size) if has_val else None
    mode = "separate validation data" if val_corpus else ("documents" if holdout else "none")
    if holdout and (train.num_blocks == 0 or val.num_blocks == 0):  # type: ignore[union-attr]
        # too few documents to split by document: tokenise everything and hold out the tail blocks
        all_path = folder / "all.tokens"
        build_token_file(corpus, tokenizer, all_path, f"{corpus.fingerprint} | all")
        total = TokenDataset(all_path, block_size).num_blocks
        n_val = max(1, round(val_fraction * total))
        if total - n_val < 1:
            raise DataError(f"{corpus.description} gives {total} block(s) of {block_size} tokens, too few to hold "
                            "out validation; use more data, a smaller block size or val_fraction=0")
        train = TokenDataset(all_path, block_size, (0, total - n_val))
        val = TokenDataset(all_path, block_size, (total - n_val, total))
        mode = "tail blocks (too few documents to split by document)"
    if train.num_blocks == 0:
        raise DataError(f"{corpus.description} gives only {train.num_tokens} training tokens, less than one block "
                        f"of {block_size}; use more data or a smaller block size")
    if val_corpus and val.num_blocks == 0:  # type: ignore[union-attr]
        raise DataError(f"the validation data {val_corpus.description} gives only {val.num_tokens} tokens, "
                        f"less than one block of {block_size}; use more validation data or a smaller block size")
    info = {"source": corpus.description, "cache": str(folder), "reused": reused, "split": mode,
            "train_tokens": train.num_blocks * block_size, "train_blocks": train.num_blocks,
            "train_documents": train.meta["num_documents"],
            "val_tokens": val.num_blocks * block_size if val else 0, "val_blocks": val.num_blocks if val else 0,
            "val_documents": val.meta["num_documents"] if val else 0, "dtype": train.meta["dtype"],
            "skipped_files": len(corpus.skipped) + (len(val_corpus.skipped) if val_corpus else 0)}
    return train, val, info
