import base64
import json
import time

import pytest

from calmlm.cli import main
from calmlm.errors import CalmError, TokenizerError
from calmlm.data.tokenizer import LLAMA3_PATTERN, Tokenizer, check_vocab, read_tiktoken_ranks, train_tokenizer

TRICKY = [
    "hello world",
    "Numbers 1234567 and 3.14159, 2025-11-23.",
    "don't I'll we've they're she's HE'S you'd",
    "  leading spaces, trailing   ",
    "tabs\t\tand\nnewlines\n\n\n  indented\r\nCRLF",
    "Unicode: café naïve Ελληνικά русский 日本語の文章 한국어 🤖🎉 👩‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Numbers like 1234567 and 42 appear; don't they? I'll see.\n",
    "Ünïcödé text, emoji 🤖 and 日本語 are bytes too.",
] * 20


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def llama3(shared_dir):
    return Tokenizer.load(shared_dir / "data" / "llama3_tokenizer")


@pytest.fixture(scope="module")
def llama3_ranks(shared_dir):
    return read_tiktoken_ranks(shared_dir / "data" / "llama3_tokenizer" / "tokenizer.model")


# -- trained tokenizer ---------------------------------------------------------------------------------

def test_trained_specials_and_round_trip(trained, tmp_path):
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 1, 2)
    assert 259 < trained.vocab_size <= 400
    for text in TRICKY:  # byte-level: any text round-trips, even unseen characters
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert 0 not in ids  # the pad/mask id is never produced by text
    assert trained.encode("<pad>") == [0]  # specials written in text are recognised by default...
    assert 0 not in trained.encode("<pad>", allow_special=False)  # ...and not when tokenising corpora
    assert trained.encode_batch(["ab", "cd"]) == [trained.encode("ab"), trained.encode("cd")]

    trained.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"
    again = Tokenizer.load(tmp_path)
    assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (0, 1, 2, trained.vocab_size)
    assert again.hash == trained.hash
    assert again.encode(TRICKY[5]) == trained.encode(TRICKY[5])
    assert Tokenizer.load(tmp_path / "tokenizer.json").vocab_size == trained.vocab_size


def test_training_is_deterministic(trained):
    assert train_tokenizer(CORPUS, vocab_size=400).backend.to_str() == trained.backend.to_str()


def test_digits_are_grouped_by_three(trained):
    pieces = trained.backend.pre_tokenizer.pre_tokenize_str("1234567")
    assert [p for p, _ in pieces] == ["123", "456", "7"]


def test_cli_train_and_encode(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("".join(CORPUS))
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "hello world"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert Tokenizer.load(tmp_path / "tok").decode(ids) == "hello world"
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope"), "x"]) == 2
    assert "no tokenizer file" in capsys.readouterr().err


# -- errors --------------------------------------------------------------------------------------------

def test_missing_and_corrupt_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer file at .*calm tokenizer train"):
        Tokenizer.load(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="holds neither tokenizer.json nor tokenizer.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json.*corrupt"):
        Tokenizer.load(tmp_path)
    model = tmp_path / "m" / "tokenizer.model"
    model.parent.mkdir()
    model.write_bytes(b"\x0a\x08sentencepiece-protobuf\x12\x00")
    with pytest.raises(TokenizerError, match="not a tiktoken rank line.*tokenizer.json instead"):
        Tokenizer.load(model)
    model.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(TokenizerError, match="ranks are not the ids"):
        Tokenizer.load(model)
    assert issubclass(TokenizerError, CalmError)


def test_check_vocab(trained):
    check_vocab(trained, trained.vocab_size)
    check_vocab(trained, 8192)
    with pytest.raises(TokenizerError, match=rf"{trained.vocab_size} tokens but the autoencoder has vocab_size 300.*"
                                             rf"vocab_size >= {trained.vocab_size}"):
        check_vocab(trained, 300, what="autoencoder")


def test_small_tiktoken_file_with_specials(tmp_path):
    # a 259-token rank file: 256 bytes + "ab", "abc" (a merge of "ab"+"c") + one special after the ranks
    lines = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(256)]
    lines += [base64.b64encode(b"ab").decode() + " 256", base64.b64encode(b"abc").decode() + " 257"]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    config = {"added_tokens_decoder": {"258": {"content": "<|end|>", "special": True}}, "eos_token": "<|end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 259 and tok.eos_id == 258 and tok.bos_id is None and tok.pad_id is None
    assert tok.encode("abcab<|end|>") == [257, 256, 258]
    assert tok.encode("abd") == [256, ord("d")]


# -- Llama 3 (tiktoken tokenizer.model from ../shared) -------------------------------------------------

def test_llama3_loads_fast_with_its_specials(shared_dir):
    start = time.perf_counter()
    tok = Tokenizer.load(shared_dir / "data" / "llama3_tokenizer")
    assert time.perf_counter() - start < 10
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, None)
    assert tok.encode("<|begin_of_text|>hi<|eot_id|>")[::2] == [128000, 128009]
    config = json.loads((shared_dir / "data" / "llama3_tokenizer" / "tokenizer_config.json").read_text())
    specials = {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()}
    assert sorted(specials) == list(range(128000, 128256))
    assert all(tok.token_to_id(content) == i for i, content in specials.items())
    assert tok.decode([128000]) == "<|begin_of_text|>"
    assert 128000 not in tok.encode("<|begin_of_text|>", allow_special=False)


def test_llama3_known_tokens(llama3, llama3_ranks):
    assert llama3.encode("hello") == [llama3_ranks[b"hello"]]
    assert llama3.encode(" world") == [llama3_ranks[b" world"]]
    assert llama3.encode("hello world") == [15339, 1917]  # the published Llama 3 ids
    assert llama3.encode("1234567") == [llama3_ranks[b"123"], llama3_ranks[b"456"], llama3_ranks[b"7"]]
    assert llama3.encode("don't")[1:] == [llama3_ranks[b"'t"]]
    assert llama3.encode("I'll")[1:] == [llama3_ranks[b"'ll"]]


def test_llama3_round_trip_tricky_text(llama3):
    for text in TRICKY:
        assert llama3.decode(llama3.encode(text)) == text


def test_llama3_matches_tiktoken(llama3, shared_dir):
    """Id for id against the real tiktoken (the reference tokenizer of the Llama 3 release)."""
    tiktoken = pytest.importorskip("tiktoken", reason="pip install tiktoken (in the test extra)")
    from tiktoken.load import load_tiktoken_bpe

    path = shared_dir / "data" / "llama3_tokenizer" / "tokenizer.model"
    reference = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                  special_tokens={})
    wiki = (shared_dir / "data" / "wikitext103_test_documents.jsonl").read_text().splitlines()
    texts = TRICKY + [json.loads(line)["text"][:20000] for line in wiki[:3]]
    for text in texts:
        assert llama3.encode(text) == reference.encode_ordinary(text)
