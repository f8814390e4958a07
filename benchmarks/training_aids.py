"""CALM's training aids side by side: the same CALM preset trained for the same steps on one autoencoder, once
per aid setting (docs/small_scale.md §6), with BrierLM at each evaluation and the time per step.

Runs are compared at equal optimizer steps (same seed, data order and validation tokens): on a shared machine
wall-clock is only comparable within runs that ran side by side, so ``--parallel`` runs go together, one thread
each. Usage:
    python benchmarks/training_aids.py --autoencoder runs/ae [--variants plain lat1 lat1_detach ...]
        [--preset small] [--steps 400] [--eval-every 200] [--brier-tokens 16384] [--seed 0] [--split-seed 0]
        [--parallel 2]
        [--runs runs/aids] [--out bench_out/training_aids.json]
``--collect`` only reads finished run folders under ``--runs`` (named after their variants) into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.common import write_json  # noqa: E402

# variant -> CALMConfig aid fields (the rest stay off; the small/base presets' own aid is turned off for "plain")
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"aux_latent_weight": 0.0},
    "lat1": {"aux_latent_weight": 1.0},
    "lat3": {"aux_latent_weight": 3.0},
    "lat1_detach": {"aux_latent_weight": 1.0, "aid_control": "detach"},  # negative control
    "lat1_constant": {"aux_latent_weight": 1.0, "aid_schedule": "constant"},
    "tok1": {"aux_latent_weight": 0.0, "aux_token_weight": 1.0},
    "tok1_until03": {"aux_latent_weight": 0.0, "aux_token_weight": 1.0, "aid_until": 0.3},
    "mean1": {"aux_latent_weight": 0.0, "head_mean_weight": 1.0},
    "lat1_mean1": {"aux_latent_weight": 1.0, "head_mean_weight": 1.0},
    "dce01": {"aux_latent_weight": 0.0, "decoder_ce_weight": 0.1},
}


def command(args: argparse.Namespace, variant: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in VARIANTS[variant].items()]
    return ["calm", "train", "--autoencoder", args.autoencoder, "--out", str(Path(args.runs) / variant),
            "--preset", args.preset, "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
            "--save-every", "0", "--brier-tokens", str(args.brier_tokens), "--precision", "fp32",
            "--seed", str(args.seed), "--split-seed", str(args.split_seed), "--device", "cpu", "--no-progress",
            *flags]


def collect(run: Path) -> dict[str, Any]:
    """A finished run's evaluations (step, BrierLM, Brier-1, validation energy loss) and seconds per step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not evals:
        raise SystemExit(f"{run} has no evaluation yet; run it to the end first")
    last = evals[-1]
    return {"evals": [{k: r.get(k) for k in ("step", "tokens", "brierlm", "brier_1", "val_energy_loss")}
                      for r in evals],
            "seconds_per_step": last["train_seconds"] / last["step"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--brier-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--split-seed", type=int, default=0, help="validation split's seed, fixed across training seeds")
    p.add_argument("--parallel", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--runs", default="bench_out/aids")
    p.add_argument("--collect", action="store_true", help="only read the finished runs")
    p.add_argument("--out", default="bench_out/training_aids.json")
    args = p.parse_args(argv)

    if not args.collect:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for i in range(0, len(args.variants), args.parallel):
            batch = args.variants[i:i + args.parallel]
            procs = [subprocess.Popen(command(args, v), env=env, stdout=subprocess.DEVNULL) for v in batch]
            if any(proc.wait() for proc in procs):
                raise SystemExit(f"a run of {batch} failed; see its folder under {args.runs}")
    runs = {v: {"aids": VARIANTS[v], **collect(Path(args.runs) / v)} for v in args.variants}
    plain = runs.get("plain")
    for r in runs.values():  # step cost against the plain run (meaningful within runs that ran side by side)
        r["step_cost_vs_plain"] = r["seconds_per_step"] / plain["seconds_per_step"] if plain else None
    path = write_json(args.out, {"benchmark": "training_aids", "autoencoder": args.autoencoder,
                                 "preset": args.preset, "steps": args.steps, "seed": args.seed,
                                 "split_seed": args.split_seed,
                                 "brier_tokens": args.brier_tokens, "runs": runs})
    for v, r in runs.items():
        e = r["evals"][-1]
        print(f"{v:14s} step {e['step']:5d}  BrierLM {e['brierlm']:6.2f}  Brier-1 {e['brier_1']:.3f}  "
              f"energy {e['val_energy_loss']:.3f}  {r['seconds_per_step']:.2f} s/step")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
