"""``calmlm.io.loading.load``: format detection, local folders vs Hugging Face repo ids, tokenizers, and
``calm convert``. Hub access is simulated with a monkeypatched ``snapshot_download`` (no network in tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from calmlm.io import loading
from calmlm.cli import main as cli_main
from calmlm.cli.convert import parse_size
from calmlm.config import calm_preset
from calmlm.errors import CheckpointError
from calmlm.io.loading import HUB_PATTERNS, detect_format, load, looks_like_repo_id
from calmlm.models import build_model

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
TINY = FIXTURES / "upstream_tiny_k4"
needs_tiny = pytest.mark.skipif(not (TINY / "reference.safetensors").is_file(),
                                reason=f"reference fixtures not found at {TINY} (shared fixtures are not checked in)")


def _native(tmp_path: Path, tokenizer=None) -> Path:
    from calmlm.io.checkpoint import save_model

    torch.manual_seed(0)
    model = build_model(calm_preset("debug"))
    return save_model(model, tmp_path / "native", tokenizer=tokenizer)


def _tiny_tokenizer():
    from calmlm.data.tokenizer import train_tokenizer

    return train_tokenizer(["the cat sat on the mat", "a dog and a cat"] * 20, vocab_size=300)


def test_native_folder_is_detected_and_loaded(tmp_path: Path) -> None:
    folder = _native(tmp_path)
    assert detect_format(folder) == "native"
    m = load(folder)
    assert type(m).__name__ == "CALM" and not m.training and m.tokenizer is None
    with pytest.raises(CheckpointError, match="expected"):
        load(folder, kind="baseline")


def test_tokenizer_is_attached(tmp_path: Path) -> None:
    tok = _tiny_tokenizer()
    m = load(_native(tmp_path, tokenizer=tok))
    assert m.tokenizer is not None and m.tokenizer.encode("the cat") == tok.encode("the cat")


@needs_tiny
def test_reference_folder_is_detected(tmp_path: Path) -> None:
    assert detect_format(TINY / "calm") == "reference"
    assert type(load(TINY / "autoencoder")).__name__ == "Autoencoder"
    assert type(load(str(TINY / "baseline" / "pytorch_model.bin"))).__name__ == "BaselineLM"  # a file -> its folder
    with pytest.raises(CheckpointError, match="holds a baseline model"):
        load(TINY / "baseline", kind="calm")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a model folder of a known format.*weights.npz"):
        load(tmp_path / "junk")
    (tmp_path / "junk" / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(CheckpointError, match="neither 'kind'.*nor 'architectures'"):
        load(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="unknown model kind"):
        load(tmp_path / "junk", kind="gpt")


def test_nonexistent_local_path(tmp_path: Path) -> None:
    for bad in (tmp_path / "nope", "./nope", "a/b/c", "~/missing-model"):
        with pytest.raises(CheckpointError, match="does not exist"):
            load(bad)


def test_repo_id_syntax() -> None:
    assert looks_like_repo_id("cccczshao/CALM-M")
    assert not looks_like_repo_id("/abs/path") and not looks_like_repo_id("a/b/c")
    assert not looks_like_repo_id("../x") and not looks_like_repo_id("CALM-M")


@needs_tiny
def test_repo_id_downloads_with_patterns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    shutil.copytree(TINY / "calm", snapshot)
    _tiny_tokenizer().save(snapshot)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = load("cccczshao/CALM-M", revision="main")
    assert type(m).__name__ == "CALM" and m.tokenizer is not None
    assert calls == [("cccczshao/CALM-M", "main", HUB_PATTERNS)]
    for needed in ("config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors",
                   "tokenizer.json", "tokenizer.model"):
        assert needed in HUB_PATTERNS
    assert not any(p in ("*", "*.bin", "*.pt") for p in HUB_PATTERNS)  # no optimizer states or training args


def test_hub_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"Hugging Face Hub failed.*Network is unreachable.*--local-dir"):
        load("someone/missing-model")


# -- calm convert --------------------------------------------------------------------------------------------

def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size("1024") == 1024 and parse_size("1.5G") == 1_500_000_000
    with pytest.raises(CheckpointError, match="not a size"):
        parse_size("big")


@needs_tiny
def test_convert_dtype_tokenizer_and_shards(tmp_path: Path) -> None:
    tok_dir = _tiny_tokenizer().save(tmp_path / "tok")
    dst = tmp_path / "out"
    assert cli_main(["convert", str(TINY / "baseline"), str(dst), "--dtype", "bfloat16",
                     "--max-shard-size", "100KB", "--tokenizer", str(tok_dir / "tokenizer.json")]) == 0
    assert (dst / "model.safetensors.index.json").is_file() and (dst / "tokenizer.json").is_file()
    m = load(dst)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.tokenizer is not None
    ref = load(TINY / "baseline")
    assert torch.equal(m.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16))


def test_convert_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_loading_module_exports() -> None:
    assert callable(loading.load) and callable(loading.resolve)


def test_tokenizer_with_extra_special_token(tmp_path: Path) -> None:
    """Llama 3 + [PAD] (128257 ids) beside 128256-row weights: warn, do not fail; real extra tokens fail."""
    from calmlm.io.checkpoint import save_model
    from calmlm.errors import TokenizerError

    tok = _tiny_tokenizer()
    n = tok.vocab_size
    tok.backend.add_special_tokens(["[PAD]"])
    folder = save_model(build_model(calm_preset("debug", vocab_size=n)), tmp_path / "m", tokenizer=tok)
    with pytest.warns(UserWarning, match=r"\[PAD\]"):
        assert load(folder).tokenizer.vocab_size == n + 1
    tok.backend.add_tokens(["notspecial"])
    tok.save(folder)
    with pytest.raises(TokenizerError, match="vocab_size"):
        load(folder)
