"""`calm eval` and `calm plot accuracy-diversity` on tiny saved checkpoints, plus the plotting helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calmlm.models.baseline import BaselineLM
from calmlm.models.calm import CALM
from calmlm.io.checkpoint import save_model
from calmlm.cli import main
from calmlm.config import baseline_preset, calm_preset
from calmlm.data.tokenizer import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog. " * 20 + f"Document number {i}." for i in range(30)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer(TEXT, vocab_size=400)
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    torch.manual_seed(0)
    out = {"data": corpus, "root": root}
    for name, model in (("calm", CALM(calm_preset("debug", chunk_size=2))),
                        ("baseline", BaselineLM(baseline_preset("debug")))):
        out[name] = save_model(model, root / name, tok)
    # a checkpoint that records its training data: evaluated on its own validation split by default
    out["recorded"] = save_model(BaselineLM(baseline_preset("debug")), root / "recorded", tok,
                                 metadata={"data": {"spec": str(corpus), "val_fraction": 0.2, "seed": 0}})
    out["bare"] = save_model(BaselineLM(baseline_preset("debug")), root / "bare")  # no tokenizer
    return out


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_eval_json(folders: dict[str, Path], capsys: pytest.CaptureFixture[str], kind: str) -> None:
    code, out, err = _eval(capsys, "--model", str(folders[kind]), "--data", str(folders["data"]),
                           "--block-size", "32", "--max-tokens", "96", "--batch-size", "2",
                           "--cache-dir", str(folders["root"] / "cache"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["kind"] == kind and r["block_size"] == 32 and r["num_tokens"] == 96
    assert 0.0 <= r["brierlm"] <= 100.0 and all(-1 <= r[f"brier_{n}"] <= 1 for n in range(1, 5))


def test_eval_text_report_states_protocol(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _eval(capsys, "--model", str(folders["calm"]), "--data", str(folders["data"]),
                           "--block-size", "16", "--max-tokens", "64", "--no-progress",
                           "--cache-dir", str(folders["root"] / "cache"))
    assert code == 0, err
    assert "block size 16 tokens" in out and "64 tokens evaluated" in out and "BrierLM" in out
    assert "chunk accuracy" in out


def test_eval_defaults_to_recorded_validation_split(folders: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _eval(capsys, "--model", str(folders["recorded"]), "--block-size", "16", "--max-tokens", "32",
                           "--cache-dir", str(folders["root"] / "cache"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["data"].startswith("validation split") and r["num_tokens"] == 32


def test_eval_errors(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _eval(capsys, "--model", str(folders["baseline"]), "--block-size", "16")
    assert code == 2 and "--data" in err  # no recorded data: asks for --data
    code, _, err = _eval(capsys, "--model", str(folders["bare"]), "--data", str(folders["data"]))
    assert code == 2 and "--tokenizer" in err
    code, _, err = _eval(capsys, "--model", str(folders["calm"]), "--data", str(folders["data"]),
                         "--block-size", "15", "--cache-dir", str(folders["root"] / "cache"))
    assert code == 2 and "multiple of" in err


def test_plot_accuracy_diversity(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = folders["root"] / "fig" / "acc.png"
    code = main(["plot", "accuracy-diversity", "--model", str(folders["calm"]), "--model", str(folders["baseline"]),
                 "--data", str(folders["data"]), "--block-size", "16", "--max-tokens", "64",
                 "--temperatures", "1", "0.5", "--pool-sizes", "4", "8", "--no-progress",
                 "--cache-dir", str(folders["root"] / "cache"), "--out", str(png), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(captured.out)["models"]
    calm_pts = report[str(folders["calm"])]["points"]
    assert [(p["temperature"], p["pool_size"]) for p in calm_pts] == [(1.0, None), (0.5, 4), (0.5, 8)]
    assert len(report[str(folders["baseline"])]["points"]) == 2


def test_plot_accuracy_vs_noise(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from calmlm.evaluation.plotting import plot_accuracy_vs_noise

    results = {"sigmas": [0.0, 0.1, 0.3], "token_accuracy": {"0.0": 1.0, "0.1": 0.99, "0.3": 0.9},
               "chunk_accuracy": {"0.0": 1.0, "0.1": 0.97, "0.3": 0.7}}
    path = plot_accuracy_vs_noise(results, tmp_path / "noise.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    plot_accuracy_vs_noise({"a": results, "b": results}, tmp_path / "two.png")


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    from calmlm.errors import CalmError
    from calmlm.evaluation.plotting import plot_accuracy_diversity

    real_import = builtins.__import__

    def fake_import(name: str, *a, **k):  # type: ignore[no-untyped-def]
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CalmError, match="pip install"):
        plot_accuracy_diversity([{"temperature": 1.0, "pool_size": None, "accuracy": 0.1, "collision": 0.2}],
                                tmp_path / "x.png")


@pytest.mark.slow
def test_eval_on_the_paper_set_with_llama3_tokenizer(shared_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The paper's protocol end to end: WikiText-103 test documents, Llama 3 tokenizer, 1024-token blocks."""
    from calmlm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(shared_dir / "data" / "llama3_tokenizer")
    model = save_model(CALM(calm_preset("debug", vocab_size=128256)), tmp_path / "calm", tok)
    code, out, err = _eval(capsys, "--model", str(model), "--data",
                           str(shared_dir / "data" / "wikitext103_test_documents.jsonl"), "--block-size", "1024",
                           "--max-tokens", "4096", "--cache-dir", str(tmp_path / "cache"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["block_size"] == 1024 and r["num_tokens"] == 4096 and r["available_tokens"] > 200_000


def test_token_dataset_is_recut_to_the_requested_block_size(folders: dict[str, Path], tmp_path: Path) -> None:
    from calmlm.data.corpus import TokenDataset, build_token_file
    from calmlm.evaluation.brierlm import evaluate_brierlm
    from calmlm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(folders["baseline"])
    build_token_file(TEXT[:5], tok, tmp_path / "t.tokens")
    ds = TokenDataset(tmp_path / "t.tokens", 32, (1, 3))  # blocks 1-2: tokens 32..95
    model = BaselineLM(baseline_preset("debug"))
    r = evaluate_brierlm(model, ds, block_size=16, batch_size=4, progress=False)
    assert r["block_size"] == 16 and r["num_blocks"] == 4 and r["num_tokens"] == 64
    assert evaluate_brierlm(model, ds, batch_size=4, progress=False)["block_size"] == 32
