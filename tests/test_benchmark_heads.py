"""benchmarks/heads.py runs end to end at a tiny size: three heads, one autoencoder, one table."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of scripts beside the package, not installed

from benchmarks import heads  # noqa: E402


def test_heads_benchmark_debug(tmp_path: Path, capsys) -> None:
    from calmlm.models.autoencoder import Autoencoder
    from calmlm.io.checkpoint import save_model
    from calmlm.config import autoencoder_preset
    from calmlm.data.tokenizer import train_tokenizer

    # a corpus whose 512-id tokenizer still leaves the validation split a few 64-token blocks
    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" * 20 for i in range(60)]
    (tmp_path / "data").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "data" / f"doc{i}.txt").write_text(d)
    tok = train_tokenizer(docs, vocab_size=512)
    ae = Autoencoder(autoencoder_preset("debug", vocab_size=512))
    save_model(ae, tmp_path / "ae", tokenizer=tok)

    out = tmp_path / "heads.json"
    heads.main(["--autoencoder", str(tmp_path / "ae"), "--preset", "debug", "--minutes", "5", "--max-steps", "2",
                "--data", str(tmp_path / "data"), "--block-size", "64", "--batch-size", "2", "--warmup-steps", "1",
                "--brier-tokens", "128", "--gen-batches", "1,2", "--new-tokens", "4", "--prompt-len", "4",
                "--repeats", "1", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "runs"),
                "--val-fraction", "0.2", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["head"] for r in rows] == ["energy", "flow", "diffusion"]
    assert [r["network_calls_per_chunk"] for r in rows] == [1, 20, 100]
    for r in rows:
        assert r["train_steps"] == 2 and r["train_tokens_per_s"] > 0
        assert 0.0 <= r["brierlm"] <= 100.0 and r["brier_tokens"] > 0
        assert set(r["gen_tokens_per_s"]) == {"1", "2"} and all(v > 0 for v in r["gen_tokens_per_s"].values())
        assert r["config"]["head"] == r["head"]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("## Generative heads") and md.count("\n| ") == 4  # header + three heads
    assert md in capsys.readouterr().out
