"""benchmarks/gpu_check.sh: stage selection, the eager-vs-compiled verdict and its report, and (slow) the whole
script in its CPU dry run, on an interpreter where the packages the GPU image lacks cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of scripts beside the package, not installed

from benchmarks import gpu_check  # noqa: E402

ABSENT_ON_THE_GPU_IMAGE = ("fastapi", "uvicorn", "openai", "lm_eval", "datasets")


def test_stages_are_selected_by_argument_or_environment(monkeypatch):
    monkeypatch.delenv("STAGES", raising=False)
    monkeypatch.delenv("DRY_RUN", raising=False)
    args = gpu_check.parse_args([])
    assert args.stages == list(gpu_check.DEFAULT_STAGES) and not args.dry_run
    monkeypatch.setenv("STAGES", "suite,quickstart")
    monkeypatch.setenv("DRY_RUN", "1")
    args = gpu_check.parse_args([])
    assert args.stages == ["suite", "quickstart"] and args.dry_run
    assert gpu_check.parse_args(["fsdp"]).stages == ["fsdp"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["benchmarks"])


def test_dry_run_commands_stay_on_the_cpu_at_tiny_sizes(tmp_path):
    for stage in gpu_check.ALL_STAGES:
        for cmd in gpu_check.stage_commands(stage, True, tmp_path):
            text = " ".join(cmd.argv)
            assert "calm-m" not in text and "--preset base" not in text, text
            if "suite.py" in text:
                assert "--device cpu" in text
    full = {c.name: c for s in gpu_check.ALL_STAGES for c in gpu_check.stage_commands(s, False, tmp_path)}
    assert "calm-m:transformer-s" in " ".join(full["suite_paper_compiled"].argv)
    assert "--compile" in full["suite_base_compiled"].argv and "--compile" not in full["suite_base_eager"].argv
    assert full["torchrun fsdp"].argv[2:6] == ["torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


def _suite(rows: list[dict]) -> dict:
    return {"status": "ok", "seconds": 1.0, "result": {"training": {"rows": rows}}}


def _row(model: str, step_s: float, first_s: float, mfu: float | None = 0.2) -> dict:
    return dict(model=model, family=model.split(":")[0], tokens_per_s=1000 / step_s, step_s_median=step_s,
                first_step_s=first_s, mfu=mfu, batch=8, block_size=2048)


def test_compile_verdict_speedup_break_even_and_report():
    commands = {"suite_base_eager": _suite([_row("calm:base", 1.0, 1.5), _row("baseline:base", 1.0, 1.2)]),
                "suite_base_compiled": _suite([_row("calm:base", 0.5, 41.5), _row("baseline:base", 0.8, 21.2)])}
    verdict = gpu_check.compile_verdict(commands)
    rows = {r["model"]: r for r in verdict["rows"]}
    assert rows["calm:base"]["speedup"] == pytest.approx(2.0)
    assert rows["calm:base"]["compile_s"] == pytest.approx(40.0)
    assert rows["calm:base"]["break_even_steps"] == pytest.approx(80.0)  # 40 s / 0.5 s saved per step
    assert rows["baseline:base"]["break_even_steps"] == pytest.approx(100.0)
    assert verdict["compile_by_default"] is True
    slower = {**commands, "suite_base_compiled": _suite([_row("calm:base", 0.5, 41.5), _row("baseline:base", 1.1, 9)])}
    assert gpu_check.compile_verdict(slower)["compile_by_default"] is False
    assert gpu_check.compile_verdict({})["compile_by_default"] is None  # nothing measured, nothing decided

    meta = {"torch": "2.11.0", "cuda": "13.0", "git_commit": "abc", "git_dirty": False, "time_utc": "now"}
    report = {"meta": meta, "device": "NVIDIA H200", "dry_run": False, "seconds": 400.0, "compile": verdict,
              "stages": {"suite": {"commands": commands, "status": "ok"},
                         "tests": {"commands": {"pytest -m gpu": {"status": "failed (exit 1)", "seconds": 60.0}},
                                   "tests": {"tests": 9, "passed": 7, "failures": 1, "errors": 0, "skipped": 1,
                                             "failed": ["tests.x.test_y"]}}}}
    md = gpu_check.to_markdown(report)
    assert md.startswith("# GPU check on NVIDIA H200")
    assert "| calm:base | 1,000 | 2,000 | 2.00x | 20.0% | 20.0% | 40 | 80 |" in md
    assert "7 passed, 1 failed, 1 skipped; failed: tests.x.test_y" in md
    assert "| tests | pytest -m gpu | failed (exit 1) | 60 |" in md


@pytest.mark.slow
def test_dry_run_of_every_stage_on_the_cpu(tmp_path):
    """The whole script (all stages, optional ones too) at tiny sizes on the CPU, with the packages the GPU image
    lacks made unimportable: every stage passes and OUT holds the log, JSON and markdown (2-3 minutes here)."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _Absent:\n"
        f"    names = {ABSENT_ON_THE_GPU_IMAGE!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Absent())\n")
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "PYTHONPATH": str(blocker), "STAGES": " ".join(gpu_check.ALL_STAGES)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and list(report["stages"]) == list(gpu_check.ALL_STAGES)
    for stage, info in report["stages"].items():
        assert info["status"] == "ok", (stage, info["commands"])
    assert report["stages"]["tests"]["tests"]["failures"] == 0
    fsdp = report["stages"]["fsdp"]["commands"]["torchrun fsdp"]["result"]["rows"]
    assert all(r["fsdp"] and r["backend"] == "gloo" and r["checkpoint_matches"] for r in fsdp)
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check on CPU") and "**FSDP2 under torchrun**" in md and "**calm compare**" in md
    assert "**calm quickstart**" in md and "**Generation**" in md and "eager vs compiled" in md
