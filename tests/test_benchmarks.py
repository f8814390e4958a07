"""The one-command benchmark suite (benchmarks/suite.py) runs end to end at tiny sizes and reports sane numbers;
benchmarks/code_size.py classifies lines correctly; benchmarks/sampler_revisions.py finds a revision's samplers
identical to themselves; benchmarks/decode_revisions.py decodes HEAD's tokens with the working tree;
benchmarks/generation_revisions.py times two revisions side by side."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of scripts beside the package, not installed

from benchmarks import code_size, decode_revisions, generation_revisions, sampler_revisions, suite  # noqa: E402


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_suite_debug_pair(tmp_path: Path, capsys) -> None:
    out = tmp_path / "suite.json"
    suite.main(["--device", "cpu", "--pairs", "debug:debug", "--batches", "1,2", "--temperatures", "1.0,0.5",
                "--new-tokens", "8", "--prompt-len", "16", "--pool-size", "8", "--repeats", "1",
                "--train-batch", "2", "--block-size", "64", "--train-steps", "2", "--train-warmup", "1",
                "--out", str(out)])

    data = json.loads(out.read_text())
    assert data["meta"]["device"].startswith("CPU") and data["meta"]["torch"]
    gen = data["generation"]["rows"]
    assert [(r["batch"], r["temperature"]) for r in gen] == [(1, 1.0), (1, 0.5), (2, 1.0), (2, 0.5)]
    for r in gen:
        assert r["pair"] == "debug:debug"
        assert all(_positive(r[k]) for k in ("calm_tokens_per_s", "baseline_tokens_per_s", "ratio"))
        assert r["pool_size"] == (8 if r["temperature"] < 1 else None)

    train = data["training"]
    assert [r["model"] for r in train["rows"]] == ["calm:debug", "baseline:debug"]
    for r in train["rows"]:
        assert all(_positive(r[k]) for k in ("params", "tokens_per_s", "train_flops_per_token", "achieved_tflops",
                                             "first_step_s"))
        assert r["tokens_per_step"] == 2 * 64
        assert r["mfu"] is None  # no peak on a CPU ...
    assert train["peak_tflops"] is None and "CPU" in train["peak_note"]  # ... and the output says why

    md = out.with_suffix(".md").read_text()
    assert md.startswith("## Efficiency suite on CPU")
    assert md.count("| debug:debug |") == 4
    assert "| calm:debug |" in md and "| baseline:debug |" in md and "MFU not reported" in md
    assert md in capsys.readouterr().out  # the markdown is also printed


def test_peak_table_prefers_specific_names() -> None:
    import torch

    expect = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
              "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0, "NVIDIA A10G": 125.0}
    for name, peak in expect.items():
        assert suite.lookup_peak(name)[1] == peak, name
    assert suite.lookup_peak("Some Future GPU") is None
    assert suite.peak_tflops(torch.device("cpu"), True, 100.0) == (100.0, "--peak-tflops")


def test_training_benchmark_debug(tmp_path):
    from benchmarks import training

    out = training.main(["--preset", "debug", "--batch", "2", "--block-size", "16", "--repeats", "1",
                         "--out", str(tmp_path / "t.json")])
    assert [r["model"] for r in out["rows"]] == ["autoencoder", "calm", "baseline"]
    assert all(v > 0 for r in out["rows"] for v in r["tokens_per_s"].values())
    assert (tmp_path / "t.json").exists() and "| autoencoder |" in out["table"]
    assert list(out["rows"][0]["tokens_per_s"]) == ["fp32 + logits", "fp32", "bf16"]  # the default variants
    with pytest.raises(SystemExit):
        training.main(["--variants", "fp32,fp64"])


def test_code_size_classifies_lines(tmp_path: Path) -> None:
    source = '"""Module\ndoc."""\n\nimport os  # trailing: code\n\n\ndef f():\n    """Doc."""\n    # why\n' \
             '    return """not a docstring"""\n'
    assert code_size.line_kinds(source) == {"code": 3, "docstring": 3, "comment": 1, "blank": 3}
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no revision to count")
    result = code_size.main(["HEAD", "--out", str(tmp_path / "size.json")])["HEAD"]["src"]
    assert result["total"]["lines"] == sum(result["total"][k] for k in code_size.KINDS) > 0
    assert result["total"]["lines"] == sum(v["lines"] for name, v in result.items() if name != "total")


def test_sampler_revisions_against_head(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no revision to compare with")
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", sampler_revisions.MODULE], cwd=REPO).returncode:
        pytest.skip("the sampler module has uncommitted changes: HEAD is not the working tree")
    cases = sampler_revisions.main(["--base", "HEAD", "--repeats", "1", "--out", str(tmp_path / "ab.json")])["cases"]
    assert len(cases) == 5 and all(c["identical_output"] and c["base_ms"] > 0 for c in cases.values())


def test_decode_revisions_against_head(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no revision to compare with")
    rows = decode_revisions.main(["--base", "HEAD", "--preset", "debug", "--new-tokens", "8", "--prompt-len", "6",
                                  "--repeats", "1", "--no-compile", "--out", str(tmp_path / "d.json")])["results"]
    for kind in ("calm", "baseline"):
        assert rows[kind]["identical_output"] == {"base": True, "new": True}
        assert _positive(rows[kind]["new"]["tokens_per_s_cpu"]) and _positive(rows[kind]["new_over_base_wall"])


def test_generation_revisions_debug_presets(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no revision to compare with")
    result = generation_revisions.main(["--base", "HEAD", "--rounds", "1", "--threads", "1", "--out",
                                        str(tmp_path / "gen.json"), "--", "--calm-preset", "debug",
                                        "--baseline-preset", "debug", "--batches", "1", "--temperatures", "1.0,0.5",
                                        "--new-tokens", "8", "--prompt-len", "8", "--repeats", "1", "--pool-size", "8",
                                        "--device", "cpu", "--clock", "process"])
    assert [(r["batch"], r["temperature"]) for r in result["summary"]] == [(1, 1.0), (1, 0.5)]
    assert all(_positive(r[k]) for r in result["summary"] for k in ("calm_over_baseline_base", "calm_over_baseline_new"))
    assert json.loads((tmp_path / "gen.json").read_text())["threads"] == 1


def test_training_aids_commands_parse_and_runs_collect(tmp_path: Path) -> None:
    """benchmarks/training_aids.py: every variant's `calm train` command is one the CLI accepts, with the aid
    fields it names; a finished run folder is read into evaluations and a step cost."""
    import argparse

    from benchmarks import training_aids
    from calmlm.cli import build_parser

    args = argparse.Namespace(
        autoencoder="ae", runs=str(tmp_path), preset="small", steps=8, eval_every=4, brier_tokens=64, seed=1, split_seed=0)
    for variant, aids in training_aids.VARIANTS.items():
        cmd = training_aids.command(args, variant)
        parsed = build_parser().parse_args(cmd[1:])
        assert all(getattr(parsed, k) == v for k, v in aids.items()), variant
        assert (parsed.max_steps, parsed.seed, parsed.split_seed, parsed.out) == (8, 1, 0, str(tmp_path / variant))
    run = tmp_path / "plain"
    run.mkdir()
    rows = [{"type": "train", "step": 4}, {"type": "eval", "step": 4, "tokens": 10, "brierlm": 1.0, "brier_1": 0.1,
             "val_energy_loss": 3.0, "train_seconds": 2.0},
            {"type": "eval", "step": 8, "tokens": 20, "brierlm": 2.0, "brier_1": 0.2, "val_energy_loss": 2.5,
             "train_seconds": 6.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = training_aids.collect(run)
    assert [e["brierlm"] for e in got["evals"]] == [1.0, 2.0] and got["seconds_per_step"] == 0.75
