"""One-command efficiency suite (issue 6): CALM against the baseline with the same backbone, in one run.

1. Generation tokens/s at each batch size and temperature. CALM at T < 1 uses the batch approximation
   (a pool of ``--pool-size`` draws per step); the baseline uses ordinary softmax temperature.
2. Training tokens/s and MFU of every model in the pairs: timed optimizer steps (forward + backward +
   clipping + AdamW, fused on CUDA) driven through calmlm's ``Trainer`` so the autocast policy is the
   training one; FLOPs per token from ``calmlm.evaluation.flops`` (what ``calm flops`` prints).

Random weights throughout: speed does not depend on them. Writes JSON (device, torch version and commit
in its ``meta``) and a markdown table beside it, and prints the markdown.

    python benchmarks/suite.py                       # CUDA: calm-m vs transformer-s; CPU: debug and small pairs
    python benchmarks/suite.py --pairs calm-m:transformer-s,small:small --batches 1,32 --temperatures 1,0.5
    python -m benchmarks.suite --new-tokens 32 --repeats 1 --skip-training
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import device_name, environment, time_call, write_json  # noqa: E402
from benchmarks.generation import build_pair, resolve_dtype, time_generation  # noqa: E402
from calmlm.config import BaselineConfig, CALMConfig, baseline_preset, calm_preset  # noqa: E402
from calmlm.evaluation.flops import count_parameters, training_flops_per_token  # noqa: E402
from calmlm.devices import peak_bf16_tflops  # noqa: E402
from calmlm.models import build_model  # noqa: E402
from calmlm.train.plan import RandomBlocks  # noqa: E402
from calmlm.train.trainer import TrainConfig, Trainer, resolve_precision  # noqa: E402

# Per-device defaults: the paper's Table 1 pair on a GPU, small presets that run in minutes on a CPU.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(pairs="calm-m:transformer-s", new_tokens=256, repeats=3, train_batch=8, block_size=2048,
                 train_steps=10, train_warmup=3),
    "cpu": dict(pairs="debug:debug,small:small", new_tokens=128, repeats=3, train_batch=4, block_size=256,
                train_steps=3, train_warmup=1),
}
TRAIN_PRECISION = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}  # --dtype -> TrainConfig.precision


# -- arguments -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", help="comma-separated CALM:baseline preset pairs; 'X' means X:X "
                                    "(default: calm-m:transformer-s on CUDA, debug:debug,small:small on CPU)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--temperatures", default="1.0,0.5")
    ap.add_argument("--new-tokens", type=int, help="generated tokens per sequence (default 256 CUDA / 128 CPU)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--pool-size", type=int, default=200, help="CALM draws per step for T < 1 (batch approximation)")
    ap.add_argument("--repeats", type=int, help="timed generation runs; the best counts (default 3)")
    ap.add_argument("--dtype", default="auto", choices=sorted(TRAIN_PRECISION),
                    help="auto = bf16 on CUDA, fp32 on CPU. Generation casts the weights; training keeps fp32 "
                         "weights and uses bf16 autocast, as the Trainer does")
    ap.add_argument("--compile", action="store_true", help="torch.compile in generation and training")
    ap.add_argument("--train-batch", type=int, help="blocks per training step (default 8 CUDA / 4 CPU)")
    ap.add_argument("--block-size", type=int, help="tokens per block, a multiple of K (default 2048 CUDA / 256 CPU)")
    ap.add_argument("--train-steps", type=int, help="timed optimizer steps (default 10 CUDA / 3 CPU)")
    ap.add_argument("--train-warmup", type=int, help="untimed steps first (default 3 CUDA / 1 CPU)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: dense bf16 datasheet table)")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", help="JSON path (default bench_out/suite_<cpu|cuda>.json); the .md goes beside it")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = f"bench_out/suite_{device.type}.json"
    return args


def parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        calm, _, base = item.partition(":")
        pairs.append((calm, base or calm))
    if not pairs:
        raise SystemExit("--pairs is empty; give e.g. calm-m:transformer-s")
    return pairs


def _free_memory(device: torch.device) -> None:
    """Drop the previous model before building the next one (calm-m + transformer-s are GBs on a GPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- generation ----------------------------------------------------------------------------------------

def bench_generation(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    batches = [int(b) for b in args.batches.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rows = []
    for calm_name, base_name in parse_pairs(args.pairs):
        calm, base = build_pair(calm_name, base_name, device, dtype)
        timing = dict(new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats, compile=args.compile)
        for batch in batches:
            for t in temperatures:
                calm_tps = time_generation(calm, batch, temperature=t, pool_size=args.pool_size, **timing)
                base_tps = time_generation(base, batch, temperature=t, **timing)
                row = dict(pair=f"{calm_name}:{base_name}", calm_preset=calm_name, baseline_preset=base_name,
                           batch=batch, temperature=t, pool_size=args.pool_size if t < 1 else None,
                           calm_tokens_per_s=calm_tps, baseline_tokens_per_s=base_tps, ratio=calm_tps / base_tps)
                print(f"generation {row['pair']} batch {batch} T={t}: CALM {calm_tps:,.0f} tok/s, "
                      f"baseline {base_tps:,.0f} tok/s ({row['ratio']:.2f}x)", file=sys.stderr, flush=True)
                rows.append(row)
        del calm, base
        _free_memory(device)
    return dict(new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats, timing="best of repeats",
                pool_size=args.pool_size, compile=args.compile, rows=rows)


# -- training ------------------------------------------------------------------------------------------

def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOPS for MFU, where it came from / why there is none)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, ("MFU not reported: no peak for a CPU (MFU is measured against an accelerator's "
                      "tensor-core peak); pass --peak-tflops to set one")
    if not bf16:
        return None, "MFU not reported: the peak table is dense bf16 and this run trained in fp32; pass --peak-tflops"
    name = device_name(device)
    match = lookup_peak(name)
    if match is None:
        return None, f"MFU not reported: no peak known for {name!r}; pass --peak-tflops"
    return match[1], f"dense bf16 datasheet peak for {match[0]}"


def lookup_peak(gpu_name: str) -> tuple[str, float] | None:
    """The dense bf16 peak of a GPU (calmlm.devices.PEAK_BF16_TFLOPS, also used by the quickstart's plan)."""
    return peak_bf16_tflops(gpu_name)


def bench_training_one(preset: str, config: CALMConfig | BaselineConfig, args: argparse.Namespace,
                       device: torch.device, precision: str, peak: float | None) -> dict[str, Any]:
    """Median optimizer-step time of one random-weight model -> tokens/s, achieved TFLOPS, MFU."""
    torch.manual_seed(0)
    model = build_model(config)
    data = RandomBlocks(args.train_batch, args.block_size, config.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as out_dir:  # the Trainer insists on a writable out_dir; nothing is saved
        tcfg = TrainConfig(batch_size=args.train_batch, schedule="constant", max_steps=10**9, eval_every=0,
                           save_every=0, precision=precision, compile=args.compile, out_dir=out_dir, progress=False)
        trainer = Trainer(model, data, None, tcfg, device=device)
        trainer.model.train()
        # Trainer.train_step is exactly one optimizer step of Trainer.fit (autocast, backward, clipping,
        # AdamW, scheduler); calling it directly leaves out fit's logging, evaluation and checkpointing.
        # The first step is timed apart: with --compile it holds the compilation.
        first = time_call(trainer.train_step, repeats=1, warmup=0, device=device)["median_s"]
        timing = time_call(trainer.train_step, repeats=args.train_steps, warmup=max(0, args.train_warmup - 1),
                           device=device)
    tokens_per_step = args.train_batch * args.block_size  # counted as Trainer.fit counts tokens_per_s
    tokens_per_s = tokens_per_step / timing["median_s"]
    flops_per_token = training_flops_per_token(config, context_length=args.block_size).total
    achieved = tokens_per_s * flops_per_token / 1e12
    row = dict(model=f"{config.kind}:{preset}", family=config.kind, preset=preset, params=count_parameters(config)["total"],
               trainable_params=sum(p.numel() for p in trainer.trainable), batch=args.train_batch,
               block_size=args.block_size, tokens_per_step=tokens_per_step, first_step_s=first,
               step_s_median=timing["median_s"],
               step_s_best=timing["best_s"], tokens_per_s=tokens_per_s, train_flops_per_token=flops_per_token,
               achieved_tflops=achieved, mfu=achieved / peak if peak else None,
               peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    del trainer, model
    _free_memory(device)
    return row


def training_configs(pairs: str) -> dict[tuple[str, str], CALMConfig | BaselineConfig]:
    """Every model of every pair once, in order (a preset shared by two pairs is trained once)."""
    configs: dict[tuple[str, str], CALMConfig | BaselineConfig] = {}
    for calm_name, base_name in parse_pairs(pairs):
        configs.setdefault(("calm", calm_name), calm_preset(calm_name))
        configs.setdefault(("baseline", base_name), baseline_preset(base_name))
    return configs


def check_block_size(args: argparse.Namespace) -> None:
    """Fail before the (long) generation part rather than after it; the Trainer would refuse these too."""
    for (family, preset), cfg in training_configs(args.pairs).items():
        k = getattr(cfg, "chunk_size", 1)
        if args.block_size % k:
            raise SystemExit(f"--block-size {args.block_size} is not a multiple of K={k} ({family} {preset})")
        positions = args.block_size // k if family == "calm" else args.block_size - 1
        if positions > cfg.max_position_embeddings:
            raise SystemExit(f"--block-size {args.block_size} needs {positions} positions but {family} {preset} "
                             f"has {cfg.max_position_embeddings}; use a smaller block size")


def bench_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    precision = TRAIN_PRECISION[args.dtype]
    bf16 = resolve_precision(precision, device) == "bf16"  # as the Trainer decides
    peak, peak_note = peak_tflops(device, bf16, args.peak_tflops)
    rows = []
    for (_, preset), config in training_configs(args.pairs).items():
        row = bench_training_one(preset, config, args, device, precision, peak)
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        print(f"training {row['model']}: {row['tokens_per_s']:,.0f} tok/s, {row['achieved_tflops']:.3g} TFLOPS{mfu}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return dict(batch=args.train_batch, block_size=args.block_size, steps=args.train_steps, warmup=args.train_warmup,
                timing="median step", precision="bf16 autocast" if bf16 else "fp32", compile=args.compile, peak_tflops=peak,
                peak_note=peak_note, rows=rows)


# -- report --------------------------------------------------------------------------------------------

def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def to_markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    commit = f"{meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}"
    lines = [f"## Efficiency suite on {meta['device']}", "",
             f"torch {meta['torch']}, commit {commit}, generation dtype {report['dtype']}, random weights.", ""]
    gen = report.get("generation")
    if gen:
        lines += [f"### Generation (prompt {gen['prompt_len']}, {gen['new_tokens']} new tokens, best of "
                  f"{gen['repeats']}{', compiled' if gen['compile'] else ''})", "",
                  "| pair | batch | T | CALM tok/s | baseline tok/s | CALM / baseline |", "|---|---|---|---|---|---|"]
        for r in gen["rows"]:
            lines.append(f"| {r['pair']} | {r['batch']} | {r['temperature']:g} | {r['calm_tokens_per_s']:,.0f} | "
                         f"{r['baseline_tokens_per_s']:,.0f} | {r['ratio']:.2f}× |")
        lines += ["", f"CALM at T < 1: batch approximation with a pool of N = {gen['pool_size']} draws per step; "
                      "baseline: softmax temperature."]
        lines.append("")
    train = report.get("training")
    if train:
        lines += [f"### Training (batch {train['batch']} × {train['block_size']} tokens, precision {train['precision']}, "
                  f"median of {train['steps']} steps after {train['warmup']} warm-up"
                  f"{', compiled' if train['compile'] else ''})", "",
                  "| model | params | tokens/s | train FLOPs/token | achieved TFLOPS | MFU | first step s |",
                  "|---|---|---|---|---|---|---|"]
        for r in train["rows"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['model']} | {_params(r['params'])} | {r['tokens_per_s']:,.0f} | "
                         f"{r['train_flops_per_token']:.3e} | {r['achieved_tflops']:.3g} | {mfu} | "
                         f"{r.get('first_step_s', float('nan')):.2f} |")
        peak = f"peak {train['peak_tflops']:g} TFLOPS ({train['peak_note']})" if train["peak_tflops"] else train["peak_note"]
        lines += ["", "Step = forward + backward + clipping + AdamW through calmlm's Trainer; params exclude CALM's "
                      "frozen autoencoder; FLOPs/token as `calm flops --context <block>`; the first step (not in "
                      "the median) holds any compilation. " + peak + "."]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    report: dict[str, Any] = dict(benchmark="suite", device_type=device.type, dtype=str(dtype).replace("torch.", ""),
                                  pairs=[f"{c}:{b}" for c, b in parse_pairs(args.pairs)])
    if not args.skip_training:
        check_block_size(args)
    if not args.skip_generation:
        report["generation"] = bench_generation(args, device, dtype)
    if not args.skip_training:
        report["training"] = bench_training(args, device)
    out = write_json(args.out, report, device)
    markdown = to_markdown(report, environment(device))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
