"""End to end through the `calm` CLI at debug scale: train-ae -> train / train-baseline -> generate / eval."""

import errno
import json
import re
from pathlib import Path

import pytest

from calmlm.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max-steps", "12", "--eval-every", "0", "--save-every", "0", "--block-size", "32", "--batch-size", "4",
          "--no-progress", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": f"document {i}: " + " ".join(f"word{(i * j) % 37}" for j in range(60))})
             for i in range(60)]
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return d / "docs.jsonl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("runs")
    cache = str(root / "cache")
    data = ["--data", str(corpus), "--cache-dir", cache, "--val-fraction", "0.1"]
    assert main(["train-ae", "--preset", "debug", "--vocab-size", "300", "--out", str(root / "ae"), *data, *COMMON]) == 0
    assert main(["train", "--autoencoder", str(root / "ae"), "--preset", "debug", "--out", str(root / "calm"),
                 "--brier-tokens", "128", *data, *COMMON]) == 0
    assert main(["train-baseline", "--tokenizer", str(root / "ae"), "--preset", "debug", "--out", str(root / "base"),
                 "--brier-tokens", "128", *data, *COMMON]) == 0
    return root, data


def test_runs_have_checkpoints_and_metrics(runs):
    root, _ = runs
    for name, kind in (("ae", "autoencoder"), ("calm", "calm"), ("base", "baseline")):
        cfg = json.loads((root / name / "checkpoint" / "config.json").read_text())
        assert cfg["kind"] == kind and cfg["data"]["val_fraction"] == 0.1
        assert (root / name / "checkpoint" / "tokenizer.json").exists()
        records = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert any(r["type"] == "eval" for r in records)
    evals = [json.loads(x) for x in (root / "calm" / "metrics.jsonl").read_text().splitlines()]
    assert "brierlm" in [r for r in evals if r["type"] == "eval"][-1]
    calm_cfg = json.loads((root / "calm" / "checkpoint" / "config.json").read_text())
    ae_cfg = json.loads((root / "ae" / "checkpoint" / "config.json").read_text())
    assert calm_cfg["autoencoder"]["latent_size"] == ae_cfg["latent_size"]  # the CALM records its autoencoder


def test_generate_and_eval_cli(runs, capsys):
    root, _ = runs
    assert main(["generate", "--model", str(root / "calm"), "--prompt", "document 3:", "--max-new-tokens", "8",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("document 3:")
    assert main(["generate", "--model", str(root / "calm"), "--prompt", "word", "--max-new-tokens", "8",
                 "--temperature", "0.5", "--num-samples", "2", "--pool-size", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
    assert main(["generate", "--model", str(root / "base"), "--prompt", "word", "--max-new-tokens", "5",
                 "--temperature", "0.7", "--top-k", "20"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(root / "calm"), "--block-size", "32", "--max-tokens", "128", "--json",
                 "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["block_size"] == 32 and r["num_tokens"] == 128 and "brierlm" in r
    assert main(["eval-ae", "--model", str(root / "ae"), "--block-size", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["token_accuracy"]) == {"0.0", "0.1", "0.2", "0.3", "0.5"} and r["num_tokens"] > 0


def test_resume_continues_a_run(runs, capsys):
    root, data = runs
    args = ["train-baseline", "--tokenizer", str(root / "ae"), "--preset", "debug", "--out", str(root / "base"),
            "--brier-tokens", "128", *data, *COMMON]
    args[args.index("--max-steps") + 1] = "14"
    assert main([*args, "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (root / "base" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 14


def test_clear_errors(runs, capsys, tmp_path):
    root, data = runs
    assert main(["generate", "--model", str(root / "calm"), "--temperature", "1.5"]) == 2
    assert "temperature must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--autoencoder", str(root / "ae"), "--out", str(tmp_path / "x"), *data, "--max-steps", "2",
                 "--block-size", "30", "--no-progress"]) == 2
    assert "multiple of" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train-ae", "--out", str(tmp_path / "y"), "--data", str(empty), "--preset", "debug"]) == 2
    assert "error:" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    assert main(["eval-ae", "--model", str(corrupt)]) == 2
    assert "error:" in capsys.readouterr().err
    long_prompt = " ".join(["word1"] * 600)
    assert main(["generate", "--model", str(root / "base"), "--prompt", long_prompt, "--max-new-tokens", "4"]) == 2
    assert "context" in capsys.readouterr().err


def test_disk_full_and_skipped_files_are_one_line_each(runs, capsys, tmp_path, monkeypatch):
    import calmlm.io.checkpoint as ckpt

    root, data = runs
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "good.txt").write_text("some words " * 50)
    (tmp_path / "docs" / "latin.txt").write_bytes("café".encode("latin-1"))
    assert main(["tokenizer", "train", "--data", str(tmp_path / "docs"), "--vocab-size", "280",
                 "--out", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: skipped 1 of the 2 files under {tmp_path / 'docs'} that cannot be read as UTF-8 text: "
        f"{tmp_path / 'docs' / 'latin.txt'} (not UTF-8: byte 0xe9 at offset 3); convert them to UTF-8 or make them "
        "readable to include them"]

    write_state = ckpt.save_training_state

    def disk_full(directory, **state):
        if state["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_state(directory, **state)

    monkeypatch.setattr(ckpt, "save_training_state", disk_full)
    args = ["train-baseline", "--tokenizer", str(root / "ae"), "--preset", "debug", "--out", str(tmp_path / "run"),
            *data, *COMMON]
    args[args.index("--max-steps") + 1], args[args.index("--save-every") + 1] = "2", "1"
    assert main(args) == 2
    checkpoint = tmp_path / "run" / "checkpoint"
    assert capsys.readouterr().err.splitlines() == [
        f"error: saving the checkpoint of step 2 to {checkpoint} failed (No space left on device); the last good "
        f"checkpoint (step 1) is still at {checkpoint}; free some disk space or choose another output folder, then "
        "resume from it (--resume)"]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.replace("pip install ", "pip install -q ") in ci


@pytest.mark.slow
def test_quickstart_debug(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--minutes", "0.5", "--size", "debug",
                 "--brier-tokens", "512", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert set(summary["models"]) == {"calm", "baseline"}
    assert "summary" in capsys.readouterr().out
