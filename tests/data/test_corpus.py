import errno
import io
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from calmlm.data.corpus import (BlockSampler, TokenDataset, build_token_file, is_validation, iter_blocks, open_corpus,
                         prepare_corpus, split_documents, stack_blocks, stdlib_corpus, token_blocks,
                         token_dtype)
from calmlm.errors import CalmWarning, DataError, TokenizerError
from calmlm.data.tokenizer import train_tokenizer

DOCS = [f"Document {i}: " + "some words and numbers 12345 " * (1 + i % 7) for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300)


def _write_docs(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return folder


# -- sources -------------------------------------------------------------------------------------------

def test_file_directory_glob_and_jsonl_sources(tmp_path):
    _write_docs(tmp_path / "d" / "sub", ["one", "two"])
    (tmp_path / "d" / "three.md").write_text("three")
    (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")  # not a text extension: skipped
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    assert sorted(open_corpus(str(tmp_path / "d"))) == ["one", "three", "two"]
    assert sorted(open_corpus(str(tmp_path / "d" / "**" / "*.txt"))) == ["one", "two"]
    assert list(open_corpus(str(tmp_path / "d" / "three.md"))) == ["three"]

    rows = [{"text": "a"}, {"text": ""}, {"body": "x", "text": "b"}, "c"]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(open_corpus(str(tmp_path / "x.jsonl"))) == ["a", "b", "c"]  # empty documents skipped
    (tmp_path / "y.json").write_text(json.dumps([{"body": "p"}, {"body": "q"}]))
    assert list(open_corpus(str(tmp_path / "y.json"), text_field="body")) == ["p", "q"]


def test_stdlib_default_corpus_splits_by_file():
    corpus = open_corpus(None)
    assert "standard library" in corpus.description
    docs = list(corpus)
    assert len(docs) > 300
    assert 5_000_000 < sum(map(len, docs)) < 50_000_000  # a few million tokens
    train, val = split_documents(docs, seed=0, val_fraction=0.02)
    assert 0.005 < len(val) / len(docs) < 0.05 and len(train) + len(val) == len(docs)
    assert stdlib_corpus().fingerprint == corpus.fingerprint  # stable across calls


def test_stdlib_listing_skips_tests_and_site_packages(monkeypatch, tmp_path):
    for rel in ["os.py", "json/__init__.py", "test/test_os.py", "site-packages/pkg.py", "idlelib/idle_test/t.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(tmp_path)})
    assert sorted(stdlib_corpus()) == ["# json/__init__.py\n", "# os.py\n"]


def test_split_is_deterministic_and_independent_of_order():
    train, val = split_documents(DOCS, seed=3, val_fraction=0.1)
    assert split_documents(DOCS, seed=3, val_fraction=0.1) == (train, val)
    r_train, r_val = split_documents(DOCS[::-1], seed=3, val_fraction=0.1)
    assert sorted(r_train) == sorted(train) and sorted(r_val) == sorted(val)
    assert 5 <= len(val) <= 40
    assert split_documents(DOCS, seed=4, val_fraction=0.1)[1] != val  # the seed matters
    assert not any(is_validation(d, 3, 0.0) for d in DOCS) and all(is_validation(d, 3, 1.0) for d in DOCS)


def test_directory_and_glob_give_the_same_prepared_split(tmp_path, tok):
    folder = _write_docs(tmp_path / "docs", DOCS)
    a, av, ainfo = prepare_corpus(str(folder), tok, tmp_path / "c1", block_size=16, val_fraction=0.1, seed=1)
    b, bv, binfo = prepare_corpus(str(folder / "*.txt"), tok, tmp_path / "c2", block_size=16, val_fraction=0.1, seed=1)
    assert ainfo["split"] == "documents" and ainfo["val_documents"] == binfo["val_documents"] > 0
    # same documents on each side (the file order inside a side follows the listing, the set does not)
    assert sorted(a.tokens.tolist()) == sorted(b.tokens.tolist())
    assert sorted(av.tokens.tolist()) == sorted(bv.tokens.tolist())


# -- token files ---------------------------------------------------------------------------------------

def test_token_file_joins_documents_with_eos(tmp_path, tok):
    meta = build_token_file(["ab", "", "cd"], tok, tmp_path / "t.tokens", source="s")
    expected = tok.encode("ab") + [tok.eos_id] + tok.encode("cd") + [tok.eos_id]
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == 2 and meta["dtype"] == "uint16"
    assert np.fromfile(tmp_path / "t.tokens", dtype=np.uint16).tolist() == expected
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed into place


def test_token_dtype_selection(tmp_path, tok):
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32

    class BigVocab:  # the trained tokenizer posing as one with a Llama 3-sized vocabulary
        vocab_size, eos_id, hash = 128256, 128001, "big"

        def encode_batch(self, texts, allow_special=True):
            return [[70000, 5] for _ in texts]

    meta = build_token_file(["x"], BigVocab(), tmp_path / "big.tokens")
    assert meta["dtype"] == "uint32"
    assert TokenDataset(tmp_path / "big.tokens", 3)[0].tolist() == [70000, 5, 128001]


def test_token_file_cache_reuse_and_invalidation(tmp_path, tok):
    path = tmp_path / "t.tokens"
    assert not build_token_file(DOCS[:5], tok, path, source="v1")["reused"]

    def untouched():
        raise AssertionError("a reused token file must not read its documents")
        yield

    assert build_token_file(untouched(), tok, path, source="v1")["reused"]
    assert not build_token_file(DOCS[:6], tok, path, source="v2")["reused"]  # another source
    other = train_tokenizer(DOCS[:50], vocab_size=280)
    assert not build_token_file(DOCS[:6], other, path, source="v2")["reused"]  # another tokenizer
    with open(path, "r+b") as f:  # a truncated file (e.g. copied half-way) is rebuilt
        f.truncate(4)
    assert not build_token_file(DOCS[:6], other, path, source="v2")["reused"]


def test_prepare_corpus_caches_until_the_data_changes(tmp_path, tok):
    folder = _write_docs(tmp_path / "docs", DOCS)
    train, val, info = prepare_corpus(str(folder), tok, tmp_path / "cache", block_size=8, val_fraction=0.1, seed=0)
    assert not info["reused"] and info["train_blocks"] == train.num_blocks > 0 and val.num_blocks > 0
    _, _, again = prepare_corpus(str(folder), tok, tmp_path / "cache", block_size=8, val_fraction=0.1, seed=0)
    assert again["reused"] and again["cache"] == info["cache"]
    _, _, new_seed = prepare_corpus(str(folder), tok, tmp_path / "cache", block_size=8, val_fraction=0.1, seed=1)
    assert not new_seed["reused"]
    (folder / "doc000.txt").write_text("changed text")
    os.utime(folder / "doc000.txt", ns=(1, 1))
    _, _, changed = prepare_corpus(str(folder), tok, tmp_path / "cache", block_size=8, val_fraction=0.1, seed=0)
    assert not changed["reused"] and changed["cache"] != info["cache"]


def test_prepare_corpus_tiny_corpus_holds_out_tail_blocks(tmp_path, tok):
    (tmp_path / "one.txt").write_text(DOCS[10] * 20)  # a single document cannot be split by document
    train, val, info = prepare_corpus(str(tmp_path / "one.txt"), tok, tmp_path / "c", block_size=8, val_fraction=0.1)
    assert info["split"].startswith("tail blocks")
    assert val.num_blocks == max(1, round(0.1 * (train.num_blocks + val.num_blocks)))
    assert torch.equal(val[0], TokenDataset(train.path, 8)[train.num_blocks])


def test_prepare_corpus_separate_validation_data_and_no_validation(tmp_path, tok):
    _write_docs(tmp_path / "tr", DOCS[:100])
    _write_docs(tmp_path / "va", DOCS[100:120])
    train, val, info = prepare_corpus(str(tmp_path / "tr"), tok, tmp_path / "c", 8, val_data=str(tmp_path / "va"))
    assert info["split"] == "separate validation data"
    assert info["train_documents"] == 100 and info["val_documents"] == 20
    train, val, info = prepare_corpus(str(tmp_path / "tr"), tok, tmp_path / "c", 8, val_fraction=0.0)
    assert val is None and info["train_documents"] == 100


def test_token_dataset_blocks_are_memory_mapped(tmp_path, tok):
    build_token_file(DOCS[:20], tok, tmp_path / "t.tokens")
    flat = np.fromfile(tmp_path / "t.tokens", dtype=np.uint16)
    ds = TokenDataset(tmp_path / "t.tokens", block_size=7)
    assert isinstance(ds.tokens, np.memmap)
    assert len(ds) == ds.num_blocks == len(flat) // 7  # remainder dropped
    assert ds[0].dtype == torch.int64 and ds[0].shape == (7,)
    assert ds[3].tolist() == flat[21:28].tolist() and ds[-1].tolist() == flat[(len(ds) - 1) * 7:len(ds) * 7].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert stack_blocks(ds, [2, 0]).shape == (2, 7)
    pairs = [{"input_ids": ds[i], "loss_mask": ds[i] > 3} for i in range(3)]  # dict blocks stack key by key
    stacked = stack_blocks(pairs, [2, 0])
    assert torch.equal(stacked["input_ids"], stack_blocks(ds, [2, 0])) and stacked["loss_mask"].dtype == torch.bool
    assert torch.equal(pickle.loads(pickle.dumps(ds))[5], ds[5])
    batches = list(iter_blocks(ds, 4, rank=1, world_size=2))
    assert torch.equal(torch.cat(batches), stack_blocks(ds, range(1, len(ds), 2)))


def test_evaluation_data_is_read_once_with_clear_errors(tmp_path, tok):
    build_token_file(DOCS[:20], tok, tmp_path / "t.tokens")
    ds = TokenDataset(tmp_path / "t.tokens", block_size=8)
    recut, size = token_blocks(ds, 4)  # the same tokens in blocks of 4
    assert size == 4 and len(recut) == 2 * len(ds) and torch.equal(torch.cat([recut[0], recut[1]]), ds[0])
    blocks, size = token_blocks(torch.arange(20), 8)  # a flat stream: whole blocks, remainder dropped
    assert size == 8 and blocks.shape == (2, 8)
    assert token_blocks(blocks)[1] == 8 and token_blocks(list(blocks))[1] == 8  # any dataset of blocks
    with pytest.raises(DataError, match="needs block_size"):
        token_blocks(torch.arange(20))
    with pytest.raises(DataError, match="hold 8 tokens but block_size=4"):
        token_blocks(list(blocks), 4)
    with pytest.raises(DataError, match="token tensor"):
        token_blocks(iter(blocks))


# -- sampler -------------------------------------------------------------------------------------------

def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = BlockSampler(10, batch_size=3, seed=7)
    first = _take(s, 3)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 9 and s.batches_per_epoch == 3  # one epoch: 9 distinct blocks, 1 dropped
    assert first == _take(BlockSampler(10, 3, seed=7), 3)
    second = _take(s, 3)
    assert s.epoch == 1 and second != first
    assert _take(BlockSampler(10, 3, seed=8), 3) != first


def test_sampler_resume_equals_uninterrupted():
    straight = _take(BlockSampler(50, 4, seed=1), 40)
    s = BlockSampler(50, 4, seed=1)
    _take(s, 17)
    state = json.loads(json.dumps(s.state_dict()))  # serialisable
    resumed = BlockSampler(50, 4, seed=1)
    resumed.load_state_dict(state)
    assert straight[:17] + _take(resumed, 23) == straight
    with pytest.raises(DataError, match="global_batch_size=4 but this run has 8.*same data"):
        BlockSampler(50, 8, seed=1).load_state_dict(state)


def test_sampler_ranks_split_the_single_process_global_batch():
    single = _take(BlockSampler(37, batch_size=6, seed=5), 20)
    ranks = [_take(BlockSampler(37, batch_size=2, seed=5, rank=r, world_size=3), 20) for r in range(3)]
    for step in range(20):
        assert ranks[0][step] + ranks[1][step] + ranks[2][step] == single[step]
    state = BlockSampler(37, 6, seed=5).state_dict()
    BlockSampler(37, 2, seed=5, rank=1, world_size=3).load_state_dict(state)  # same global batch: compatible
    with pytest.raises(DataError, match="cannot fill one global batch"):
        BlockSampler(5, batch_size=2, world_size=3)


# -- errors --------------------------------------------------------------------------------------------

def test_missing_paths_and_patterns(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*missing.txt"):
        open_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matches no files"):
        open_corpus(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match="holds no text files"):
        open_corpus(str(tmp_path))
    with pytest.raises(DataError, match="no token file|not a complete token file"):
        TokenDataset(tmp_path / "none.tokens", 8)


def test_empty_corpus(tmp_path, tok):
    _write_docs(tmp_path / "d", ["", ""])
    with pytest.raises(DataError, match="contains no text"):
        prepare_corpus(str(tmp_path / "d"), tok, tmp_path / "c", 8)
    with pytest.raises(DataError, match="contains no text"):
        build_token_file([], tok, tmp_path / "t.tokens")
    assert not list((tmp_path / "c").rglob("*.tokens*"))
    (tmp_path / "few.txt").write_text("tiny")
    with pytest.raises(DataError, match="less than one block of 64; use more data or a smaller block size"):
        prepare_corpus(str(tmp_path / "few.txt"), tok, tmp_path / "c", 64, val_fraction=0.0)


def test_bad_jsonl_and_undecodable_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not valid JSON"):
        list(open_corpus(str(bad)))
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"line 2 has no text field 'text' \(found: \['content'\]\).*--text-field"):
        list(open_corpus(str(bad)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="cannot read .*latin.txt as UTF-8 text .*0xe9.*convert it to UTF-8"):
        list(open_corpus(str(latin)))  # a single file is not skipped


def _unreadable_when_mode_says_so(monkeypatch):
    """Reading a file without read permission fails as it does for a non-root user (tests may run as root)."""
    read_bytes = Path.read_bytes

    def read(path):
        if not path.stat().st_mode & 0o444:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read)


def _folder_with_bad_files(folder, good):
    _write_docs(folder, good)
    (folder / "latin.txt").write_bytes("café".encode("latin-1"))
    (folder / "locked.md").write_text("secret")
    (folder / "locked.md").chmod(0)
    (folder / "gone.txt").symlink_to(folder / "nowhere.txt")  # a dangling link: listed, cannot be read
    return folder


def test_folder_and_glob_skip_unreadable_files_with_one_warning(tmp_path, monkeypatch):
    _unreadable_when_mode_says_so(monkeypatch)
    folder = _folder_with_bad_files(tmp_path / "d", ["one", "two"])
    for spec, bad in [(folder, ["gone.txt", "latin.txt", "locked.md"]), (folder / "*.txt", ["latin.txt"])]:
        corpus = open_corpus(str(spec))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sorted(corpus) == ["one", "two"]
            assert sorted(corpus) == ["one", "two"]  # a second pass does not warn again
        assert [w.category for w in caught] == [CalmWarning]
        message = str(caught[0].message)
        assert f"skipped {len(bad)} of the " in message and "convert them to UTF-8 or make them readable" in message
        assert all(str(folder / name) in message for name in bad)
        assert sorted(Path(p).name for p, _ in corpus.skipped) == bad
    assert dict(corpus.skipped)[str(folder / "latin.txt")] == "not UTF-8: byte 0xe9 at offset 3"


def test_many_unreadable_files_are_named_a_few_then_counted(tmp_path):
    _write_docs(tmp_path / "d", ["fine"])
    for i in range(8):
        (tmp_path / "d" / f"bad{i}.txt").write_bytes(b"\xff" * 3)
    with pytest.warns(CalmWarning, match=r"skipped 8 of the 9 files under .*bad4.txt \(not UTF-8: byte 0xff at "
                                         r"offset 0\) and 3 more; convert") as caught:
        assert list(open_corpus(str(tmp_path / "d"))) == ["fine"]
    assert "bad5.txt" not in str(caught[0].message)


def test_a_folder_of_only_unreadable_files_is_an_error(tmp_path, monkeypatch):
    _unreadable_when_mode_says_so(monkeypatch)
    folder = _folder_with_bad_files(tmp_path / "d", [])
    with pytest.raises(DataError, match=r"none of the 3 files under .* can be read as UTF-8 text: .*gone.txt "
                                        r"\(No such file or directory\).*latin.txt.*locked.md \(Permission denied\); "
                                        r"convert them to UTF-8 or make them readable, or pass another --data"):
        list(open_corpus(str(folder)))
    with pytest.raises(DataError, match="cannot read .*locked.md as UTF-8 text \\(Permission denied\\); check"):
        list(open_corpus(str(folder / "locked.md")))


def test_cache_remembers_skipped_files_until_they_are_fixed(tmp_path, tok, monkeypatch):
    """A skipped file neither rebuilds the cache on every run nor drops out silently: the reused cache repeats
    the warning, and fixing the file (new content, or new permissions) changes the key, so it is then read."""
    _unreadable_when_mode_says_so(monkeypatch)
    folder = _folder_with_bad_files(tmp_path / "d", DOCS[:40])

    def prepare():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, val, info = prepare_corpus(str(folder), tok, tmp_path / "cache", 8, val_fraction=0.1)
        return info, [str(w.message) for w in caught if w.category is CalmWarning]

    built, warned = prepare()
    assert not built["reused"] and built["skipped_files"] == 3 and len(warned) == 1
    assert built["train_documents"] + built["val_documents"] == 40
    again, warned_again = prepare()
    assert again["reused"] and again["cache"] == built["cache"] and warned_again == warned

    (folder / "locked.md").chmod(0o644)  # readable now: same size and mtime, new permissions
    unlocked, warned = prepare()
    assert not unlocked["reused"] and unlocked["skipped_files"] == 2 and len(warned) == 1 and "locked" not in warned[0]
    assert unlocked["train_documents"] + unlocked["val_documents"] == 41
    (folder / "latin.txt").write_text("café")  # converted to UTF-8
    (folder / "gone.txt").unlink()
    fixed, warned = prepare()
    assert not fixed["reused"] and fixed["skipped_files"] == 0 and not warned
    assert fixed["train_documents"] + fixed["val_documents"] == 42


def test_a_full_disk_while_caching_tokens_is_one_clear_error(tmp_path, tok, monkeypatch):
    import calmlm.data.corpus as corpus_module

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus_module, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    folder = _write_docs(tmp_path / "d", DOCS[:20])
    with pytest.raises(DataError, match=r"writing the token cache .*\.tokens failed \(No space left on device\); "
                                        "free some disk space or pass another --cache-dir"):
        prepare_corpus(str(folder), tok, tmp_path / "cache", 8, val_fraction=0.1)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial token files


def test_tokenizer_without_eos(tmp_path, tok):
    from calmlm.data.tokenizer import Tokenizer

    no_eos = Tokenizer(tok.backend, bos_token="<bos>", eos_token=None)
    with pytest.raises(TokenizerError, match="no EOS token"):
        build_token_file(["x"], no_eos, tmp_path / "t.tokens")


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install calmlm\[datasets\]"):
        open_corpus("hf:wikitext")


# -- Hugging Face datasets (local folders; the Hub is not reachable from the tests) --------------------

def test_saved_dataset_folder_and_splits(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS[:30], "id": list(range(30))})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert list(open_corpus(str(tmp_path / "saved"))) == DOCS[:30]
    train, val, info = prepare_corpus(str(tmp_path / "saved"), tok, tmp_path / "c", 8, val_fraction=0.2)
    assert info["train_documents"] + info["val_documents"] == 30

    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v1", "v2"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(open_corpus(str(tmp_path / "dd") + "@validation")) == ["v1", "v2"]
    assert len(list(open_corpus(str(tmp_path / "dd")))) == 30
    with pytest.raises(DataError, match="no split 'test'.*@SPLIT"):
        list(open_corpus(str(tmp_path / "dd") + "@test"))
    with pytest.raises(DataError, match="has no 'body' field.*--text-field"):
        list(open_corpus(str(tmp_path / "saved"), text_field="body"))


def test_hf_spec_streams_a_local_parquet_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"text": DOCS[:10]}).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    assert list(open_corpus(f"hf:{tmp_path / 'pq'}")) == DOCS[:10]  # load_dataset(..., streaming=True)
    assert list(open_corpus(str(tmp_path / "pq"))) == DOCS[:10]  # a folder of parquet files
    with pytest.raises(DataError, match="loading the Hugging Face dataset .*@nosuchsplit failed"):
        list(open_corpus(f"hf:{tmp_path / 'pq'}@nosuchsplit"))
