"""The GPU check: what a session lent a GPU runs first (``bash benchmarks/gpu_check.sh``, which calls this).

Stages run in order, each command a subprocess with a time limit; a stage that fails or runs out of time is
recorded and the next one runs. The default set is capped at 8 minutes (its limits are estimates, not yet timed
on a GPU; a stage cut short says so in the report):

  tests       python3 -m pytest -m gpu: the CUDA tests (tests that need packages the machine lacks skip)
  fsdp        benchmarks/fsdp_steps.py under torchrun --nproc_per_node 1: FSDP2 steps of CALM and the baseline
              (base) over NCCL, checkpoint gathered and reloaded
  suite       benchmarks/suite.py training at the paper's pair (calm-m vs transformer-s) and at base, eager and
              compiled: tokens/s, MFU, and the first step (the compilation), whence compile's speed-up and
              break-even step count, the evidence for trainer.COMPILE_BY_DEFAULT["cuda"]
  compare     calm compare --preset base --minutes $COMPARE_MINUTES (per model; default 1)
optional:
  generation  benchmarks/suite.py generation at the paper's pair
  quickstart  calm quickstart --minutes $QUICKSTART_MINUTES (default 5)

Settings (environment variables or arguments): ``STAGES="tests suite"`` or stage names as arguments;
``DRY_RUN=1`` / ``--dry-run`` runs every stage at a tiny size on the CPU (compilation switched off), to check
the script before a GPU session spends time on it; ``BUDGET_S`` (default 480) caps the whole run, a stage
gets at most what is left; ``OUT`` (default bench_out/gpu_check) receives gpu_check.log (all output),
gpu_check.json (every stage's status, seconds and figures) and gpu_check.md (the figures as tables, headed by
the device name); intermediate files (run folders, per-command JSON) go to ``WORK`` (default: a folder in the
temporary directory), so OUT holds only those three.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = sys.executable
DEFAULT_STAGES = ("tests", "fsdp", "suite", "compare")  # in order of priority: a stage gets what is left
ALL_STAGES = (*DEFAULT_STAGES, "generation", "quickstart")
# compile on by default only where every model's steady step is this much faster and the compilation is paid
# back within this many steps (a short run should not lose time to it)
MIN_SPEEDUP, MAX_BREAK_EVEN_STEPS = 1.05, 300


@dataclass
class Command:
    name: str
    argv: list[str]
    limit_s: float
    result: Path | None = None  # the JSON the command writes
    run_dir: Path | None = None  # a run folder the command creates
    env: dict[str, str] = field(default_factory=dict)


def tiny_corpus() -> str:
    """A small corpus for the dry run: the json package of this interpreter's standard library."""
    return str(Path(json.__file__).parent / "*.py")


def stage_commands(stage: str, dry: bool, work: Path) -> list[Command]:
    """The commands of one stage: full size on the GPU, tiny on the CPU for the dry run."""
    calm = [PY, "-m", "calmlm"]
    if stage == "tests":
        return [Command("pytest -m gpu", [PY, "-m", "pytest", "-m", "gpu", "-q", "-rfEs",
                                          f"--junitxml={work / 'pytest.xml'}"], 180, work / "pytest.xml")]
    if stage == "suite":
        tiny = ["--device", "cpu", "--train-batch", "2", "--block-size", "64", "--train-steps", "1",
                "--train-warmup", "1"] if dry else []
        pairs = {"paper": "debug:debug" if dry else "calm-m:transformer-s", "base": "debug:debug" if dry else "base:base"}
        out = []
        for pair in ("paper", "base"):
            for mode in ("eager", "compiled"):
                name = f"suite_{pair}_{mode}"
                argv = [PY, "benchmarks/suite.py", "--skip-generation", "--pairs", pairs[pair], *tiny,
                        "--out", str(work / f"{name}.json"), *(["--compile"] if mode == "compiled" else [])]
                # the dry run checks the plumbing; compilation itself is tested by the test suite
                env = {"TORCHDYNAMO_DISABLE": "1"} if dry and mode == "compiled" else {}
                out.append(Command(name, argv, 180 if mode == "compiled" else 90, work / f"{name}.json", env=env))
        return out
    if stage == "fsdp":
        tiny = ["--preset", "debug", "--steps", "2", "--batch", "2", "--block-size", "64"] if dry else ["--preset", "base"]
        return [Command("torchrun fsdp", [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                          "benchmarks/fsdp_steps.py", *tiny, "--out", str(work / "fsdp.json")],
                        180, work / "fsdp.json")]
    if stage == "compare":
        minutes = float(os.environ.get("COMPARE_MINUTES", "1"))
        tiny = ["--preset", "debug", "--ae-preset", "debug", "--minutes", "0.05", "--points", "2",
                "--brier-tokens", "256", "--vocab-size", "512", "--block-size", "64", "--data", tiny_corpus(),
                "--cache-dir", str(work / "cache")] if dry else ["--preset", "base", "--minutes", f"{minutes:g}"]
        return [Command("calm compare", [*calm, "compare", *tiny, "--out", str(work / "compare"), "--no-progress"],
                        2 * 60 * (0.05 if dry else minutes) + 240, work / "compare" / "compare.json", work / "compare")]
    if stage == "generation":
        tiny = ["--device", "cpu", "--pairs", "debug:debug", "--batches", "1", "--temperatures", "1.0",
                "--new-tokens", "8", "--repeats", "1"] if dry else ["--pairs", "calm-m:transformer-s"]
        return [Command("suite generation", [PY, "benchmarks/suite.py", "--skip-training", *tiny,
                                             "--out", str(work / "suite_generation.json")], 300,
                        work / "suite_generation.json")]
    if stage == "quickstart":
        minutes = 0.5 if dry else float(os.environ.get("QUICKSTART_MINUTES", "5"))
        tiny = ["--size", "debug", "--block-size", "64", "--brier-tokens", "256", "--data", tiny_corpus()] if dry else []
        return [Command("calm quickstart", [*calm, "quickstart", "--minutes", f"{minutes:g}", *tiny,
                                            "--out", str(work / "quickstart"), "--no-progress"],
                        60 * minutes + 120, work / "quickstart" / "summary.json", work / "quickstart")]
    raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(ALL_STAGES)}")


# -- running -------------------------------------------------------------------------------------------

def _pump(stream: TextIO, log: TextIO) -> None:
    for line in stream:
        sys.stdout.write(line)
        log.write(line)
    sys.stdout.flush()
    log.flush()


def run_command(cmd: Command, log: TextIO, limit_s: float) -> dict[str, Any]:
    """Run ``cmd`` with its output going to the terminal and the log; kill its process group at ``limit_s``."""
    header = f"\n===== {cmd.name}: {' '.join(cmd.argv)}  (limit {limit_s:.0f} s)\n"
    sys.stdout.write(header)
    log.write(header)
    log.flush()
    env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), env.get("PYTHONPATH")]))
    if limit_s < 5:
        return {"status": "not run (no time left)", "seconds": 0.0}
    # a previous run's files are never reported as this one's (and a run folder left there would be resumed)
    if cmd.run_dir is not None:
        shutil.rmtree(cmd.run_dir, ignore_errors=True)
    if cmd.result is not None:
        cmd.result.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=limit_s)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timeout after {limit_s:.0f} s"
    pump.join(timeout=10)
    out: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
    if cmd.result is not None and cmd.result.suffix == ".json" and cmd.result.is_file() and status == "ok":
        out["result"] = json.loads(cmd.result.read_text())
    return out


# -- figures -------------------------------------------------------------------------------------------

def junit_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}  # type: ignore[union-attr]
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def compile_verdict(commands: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Eager against compiled, per model of the suite: speed-up, compilation overhead, break-even steps, and
    whether the numbers support compiling by default on this device."""
    rows = []
    for pair in ("paper", "base"):
        eager = commands.get(f"suite_{pair}_eager", {}).get("result", {}).get("training", {}).get("rows", [])
        compiled = commands.get(f"suite_{pair}_compiled", {}).get("result", {}).get("training", {}).get("rows", [])
        by_model = {r["model"]: r for r in compiled}
        for e in eager:
            c = by_model.get(e["model"])
            if c is None:
                continue
            saved_per_step = e["step_s_median"] - c["step_s_median"]
            overhead = c["first_step_s"] - e["first_step_s"]
            rows.append(dict(model=e["model"], eager_tokens_per_s=e["tokens_per_s"],
                             compiled_tokens_per_s=c["tokens_per_s"], speedup=c["tokens_per_s"] / e["tokens_per_s"],
                             eager_mfu=e["mfu"], compiled_mfu=c["mfu"], compile_s=overhead,
                             break_even_steps=overhead / saved_per_step if saved_per_step > 0 else None))
    ok = bool(rows) and all(r["speedup"] >= MIN_SPEEDUP and r["break_even_steps"] is not None
                            and r["break_even_steps"] <= MAX_BREAK_EVEN_STEPS for r in rows)
    rule = (f"compile by default where every model's step is >= {MIN_SPEEDUP:.2f}x faster compiled and the "
            f"compilation is paid back within {MAX_BREAK_EVEN_STEPS} steps")
    return {"rows": rows, "compile_by_default": ok if rows else None, "rule": rule}


def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def to_markdown(report: dict[str, Any]) -> str:
    meta, stages = report["meta"], report["stages"]
    lines = [f"# GPU check on {report['device']}{' (DRY RUN, tiny sizes)' if report['dry_run'] else ''}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}, commit {meta['git_commit']}"
             f"{' (dirty)' if meta['git_dirty'] else ''}, {meta['time_utc']}; total {report['seconds']:.0f} s.", "",
             "| stage | command | status | seconds |", "|---|---|---|---|"]
    for stage, info in stages.items():
        for name, c in info["commands"].items():
            lines.append(f"| {stage} | {name} | {c['status']} | {c['seconds']:.0f} |")
    tests = stages.get("tests", {}).get("tests")
    if tests:
        lines += ["", f"**Tests** (-m gpu): {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                      f"{tests['skipped']} skipped" + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else "")]
    verdict = report.get("compile")
    if verdict and verdict["rows"]:
        lines += ["", "**Training, eager vs compiled** (benchmarks/suite.py, bf16 autocast on CUDA; compile s = first "
                      "compiled step - first eager step)", "",
                  "| model | eager tok/s | compiled tok/s | speed-up | eager MFU | compiled MFU | compile s | break-even steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in verdict["rows"]:
            mfu = [_fmt(r[k], ".1%") for k in ("eager_mfu", "compiled_mfu")]
            lines.append(f"| {r['model']} | {_fmt(r['eager_tokens_per_s'])} | {_fmt(r['compiled_tokens_per_s'])} | "
                         f"{r['speedup']:.2f}x | {mfu[0]} | {mfu[1]} | {r['compile_s']:.0f} | "
                         f"{_fmt(r['break_even_steps'])} |")
        lines += ["", f"Compile by default on this device: **{verdict['compile_by_default']}** ({verdict['rule']}; "
                      "set trainer.COMPILE_BY_DEFAULT accordingly)."]
    for name, c in stages.get("suite", {}).get("commands", {}).items():
        rows = c.get("result", {}).get("training", {}).get("rows", [])
        calm = [r for r in rows if r["family"] == "calm"]
        base = [r for r in rows if r["family"] == "baseline"]
        if calm and base:
            lines.append(f"- {name}: CALM / baseline tokens/s = {calm[0]['tokens_per_s'] / base[0]['tokens_per_s']:.2f}"
                         f" ({calm[0]['model']} vs {base[0]['model']}, batch {calm[0]['batch']} x {calm[0]['block_size']})")
    fsdp = stages.get("fsdp", {}).get("commands", {}).get("torchrun fsdp", {}).get("result")
    if fsdp:
        lines += ["", "**FSDP2 under torchrun** (benchmarks/fsdp_steps.py)", "",
                  "| model | backend | world | precision | steps | last tok/s | loss | val loss | checkpoint = live |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in fsdp["rows"]:
            lines.append(f"| {r['model']} | {r['backend']} | {r['world_size']} | {r['precision']} | {r['steps']} | "
                         f"{_fmt(r['tokens_per_s'])} | {_fmt(r['loss'], '.4f')} | {_fmt(r['val_loss'], '.4f')} | "
                         f"{r.get('checkpoint_matches')} |")
    compare = stages.get("compare", {}).get("commands", {}).get("calm compare", {}).get("result")
    if compare:
        lines += ["", f"**calm compare** ({compare['config']['preset']}, {compare['budget']:.0f} s per model)", "",
                  "| run | steps | train s | tokens/s | final BrierLM | val loss |", "|---|---|---|---|---|---|"]
        for name, info in compare["runs"].items():
            last = max(info["points"], key=lambda p: p["step"])
            tps = last["tokens"] / last["train_seconds"] if last.get("train_seconds") else None
            lines.append(f"| {name} | {last['step']} | {last['train_seconds']:.0f} | {_fmt(tps)} | "
                         f"{last['brierlm']:.2f} | {_fmt(last.get('val_loss'), '.3f')} |")
    gen = stages.get("generation", {}).get("commands", {}).get("suite generation", {}).get("result")
    if gen:
        lines += ["", "**Generation** (benchmarks/suite.py)", "", "| pair | batch | T | CALM tok/s | baseline tok/s | ratio |",
                  "|---|---|---|---|---|---|"]
        for r in gen["generation"]["rows"]:
            lines.append(f"| {r['pair']} | {r['batch']} | {r['temperature']:g} | {r['calm_tokens_per_s']:,.0f} | "
                         f"{r['baseline_tokens_per_s']:,.0f} | {r['ratio']:.2f}x |")
    quick = stages.get("quickstart", {}).get("commands", {}).get("calm quickstart", {}).get("result")
    if quick:
        lines += ["", f"**calm quickstart** ({quick['minutes_budget']:g} min, {quick['elapsed_minutes']} min used)", "",
                  "| model | steps | train min | BrierLM | val loss |", "|---|---|---|---|---|"]
        for name, m in quick["models"].items():
            lines.append(f"| {name} | {m['train_steps']} | {m['train_minutes']} | {m['brierlm']:.2f} | "
                         f"{_fmt(m.get('val_loss'), '.3f')} |")
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", help=f"stages to run (default: $STAGES or {' '.join(DEFAULT_STAGES)})")
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                    help="every stage at a tiny size on the CPU ($DRY_RUN=1)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", "480")))
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out/gpu_check")
    args = ap.parse_args(argv)
    args.stages = args.stages or os.environ.get("STAGES", " ".join(DEFAULT_STAGES)).replace(",", " ").split()
    unknown = [s for s in args.stages if s not in ALL_STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; stages: {', '.join(ALL_STAGES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    work = Path(os.environ.get("WORK") or Path(tempfile.gettempdir()) / "calm_gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from benchmarks.common import device_name, environment

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print("warning: no CUDA device; the stages run at full size on the CPU (use DRY_RUN=1 for a quick check)",
              file=sys.stderr)
    report: dict[str, Any] = {"meta": environment(device), "device": device_name(device), "dry_run": args.dry_run,
                              "stages": {}}
    start = time.perf_counter()
    deadline = start + args.budget_s
    with open(out / "gpu_check.log", "w") as log:
        log.write(f"GPU check on {report['device']}; stages {args.stages}; dry run {args.dry_run}\n")
        for stage in args.stages:
            info: dict[str, Any] = {"commands": {}}
            for cmd in stage_commands(stage, args.dry_run, work):
                limit = min(cmd.limit_s, deadline - time.perf_counter())
                info["commands"][cmd.name] = run_command(cmd, log, limit)
            info["status"] = "ok" if all(c["status"] == "ok" for c in info["commands"].values()) else "failed"
            if stage == "tests":
                info["tests"] = junit_summary(work / "pytest.xml")
            report["stages"][stage] = info
        if "suite" in report["stages"]:
            report["compile"] = compile_verdict(report["stages"]["suite"]["commands"])
        report["seconds"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        markdown = to_markdown(report)
        (out / "gpu_check.md").write_text(markdown)
        log.write("\n" + markdown)
    print("\n" + markdown)
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'} and {out / 'gpu_check.log'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
