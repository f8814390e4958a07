"""`calm quickstart`: the whole CALM pipeline on the embedded default corpus within a time budget.

plan -> tokenizer -> autoencoder (+ robustness evaluation and plot) -> CALM and the baseline, trained for the same
wall-clock time on the same data -> BrierLM of both on the same validation tokens -> samples at T = 1 and
T = 0.5, all in one run folder with a summary.json. The whole run, evaluation and sampling included, ends
within --minutes.

The plan (calmlm.train.plan) first times a few training steps of the candidates on this machine: thread count,
precision (bf16 autocast only where it is measurably faster), vocabulary (8192, or 4096 where the autoencoder
would not reach its target in time), model size (--size auto: the largest whose models still get enough steps)
and, on a GPU, the batch that keeps it busy. It prints the device, the measured tokens/s of each model and the
minutes of each stage. The autoencoder trains until it reaches 99.5 % token accuracy or its share of the time
(at most half) runs out; CALM and the baseline then split what is left equally. When the targets cannot fit the
budget, the plan says so before training and names the minutes they would need.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..config import preset_names
from ..train import workflows as wf
from ..train.recipes import TARGET_STOPPED_AE, recipe
from ..io.metrics import last_eval, read_metrics
from .options import DEVICE_HELP

# Wall-clock kept back for evaluation and samples (seconds, at most a share of the budget): the autoencoder's
# evaluation, then each model's final BrierLM and samples (measured on the 2-core CPU at the small preset).
RESERVE_AE_S, RESERVE_AE_SHARE = 20.0, 0.03
RESERVE_PER_MODEL_S, RESERVE_PER_MODEL_SHARE = 45.0, 0.06
TOKENIZE_S, TOKENIZE_SHARE = 60.0, 0.1  # the plan's estimate of the tokenizer + corpus stage (CPU, default corpus)
SIZES = ["auto", *sorted(set(preset_names("calm")) & set(preset_names("baseline")))]  # presets of both models
PROMPT = "def "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on the default corpus (tokenizer, autoencoder, "
                                          "CALM, baseline, evaluation, samples)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--minutes", type=float, default=15.0, help="total time budget, planning, evaluation and samples "
                                                               "included")
    p.add_argument("--data", default=None, help="corpus (default: the Python standard library)")
    p.add_argument("--size", choices=SIZES, default="auto",
                   help="model presets (default auto: the largest whose models still get enough steps, measured)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary (default: measured: 8192, or 4096 where the autoencoder would not reach its "
                        "target in time with 8192)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per block, also BrierLM's context (default: 256; on a GPU longer where measured faster)")
    p.add_argument("--brier-tokens", type=int, default=16384, help="validation tokens scored by BrierLM")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: measured (bf16 autocast where it trains faster, e.g. CUDA and AMX CPUs)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _stage(name: str) -> None:
    print(f"\n== {name} ==", flush=True)


def target_control(metrics: Path, every: int, target: float) -> Any:
    """The autoencoder's trainer control: evaluate every ``every`` steps, stop once an evaluation reached ``target``
    token accuracy (sigma 0)."""
    def control(step: int, seconds: float) -> tuple[bool, bool]:
        last = last_eval(metrics, "token_acc_sigma0") if step % every == 1 or every == 1 else None
        return step % every == 0, bool(last and last["token_acc_sigma0"] >= target)
    return control


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..evaluation.autoencoder import evaluate_autoencoder, format_autoencoder_report
    from ..evaluation.plotting import plot_accuracy_vs_noise
    from ..io.loading import load
    from ..train.plan import plan_run

    t0 = time.perf_counter()
    budget = args.minutes * 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)

    def left() -> float:
        return t0 + budget - time.perf_counter()

    ae_reserve = min(RESERVE_AE_S, RESERVE_AE_SHARE * budget)
    models_reserve = 2 * min(RESERVE_PER_MODEL_S, RESERVE_PER_MODEL_SHARE * budget)
    _stage("1/6 plan: timing a few training steps of each candidate on this machine")
    plan = plan_run(budget, left() - ae_reserve - models_reserve - min(TOKENIZE_S, TOKENIZE_SHARE * budget), device,
                    size=args.size, precision=args.precision, vocab_size=args.vocab_size, block_size=args.block_size)

    opts = wf.DataOptions(data=args.data, block_size=plan.block_size, seed=args.seed,
                          cache_dir=str(out / "token_cache"))

    def cfg(kind: str, seconds: float, **overrides: Any) -> Any:
        stage = plan.stages[kind]
        return recipe(kind, stage.preset, max_steps=10**7, eval_every=0, save_every=0, seed=args.seed,
                      block_size=plan.block_size, precision=plan.precision, batch_size=stage.batch_size,
                      time_budget_s=max(seconds, 1.0), out_dir=str(out / kind), progress=not args.no_progress,
                      **overrides)

    _stage("2/6 tokenizer + autoencoder")
    tok = wf.get_tokenizer(None, opts, plan.vocab_size, out / "autoencoder")  # where train_autoencoder looks for it
    _, val, _ = wf.prepare_data(opts, tok)  # tokenised once, cached: not charged to the autoencoder's time
    plan.split(left() - ae_reserve - models_reserve)
    print(plan.format(), flush=True)
    ae = plan.stages["autoencoder"]
    check_every = max(25, ae.expected_steps // 20)
    wf.train_autoencoder(opts, cfg("autoencoder", ae.minutes * 60, **TARGET_STOPPED_AE), preset=ae.preset,
                         device=str(device),
                         control=target_control(out / "autoencoder" / "metrics.jsonl", check_every, ae.target))
    ae_report = evaluate_autoencoder(load(out / "autoencoder", kind="autoencoder", device=str(device)), val,
                                     max_blocks=200)
    print(format_autoencoder_report(ae_report))
    print(f"plot: {plot_accuracy_vs_noise(ae_report, out / 'autoencoder_accuracy.png')}")

    # CALM and the baseline get the same training time: half of what is left after the final evaluations
    lm_seconds = (left() - models_reserve) / 2
    _stage(f"3/6 CALM ({lm_seconds / 60:.1f} min)")
    wf.train_calm(opts, cfg("calm", lm_seconds), str(out / "autoencoder"), preset=plan.size, device=str(device),
                  brier_tokens=args.brier_tokens)
    _stage(f"4/6 baseline ({lm_seconds / 60:.1f} min)")
    wf.train_baseline(opts, cfg("baseline", lm_seconds), tokenizer=str(out / "autoencoder"), preset=plan.size,
                      device=str(device), brier_tokens=args.brier_tokens)

    _stage("5/6 evaluation (BrierLM on the validation split, at the end of training)")
    summary: dict[str, Any] = {"minutes_budget": args.minutes, "precision": plan.precision, "device": plan.device_name,
                               "corpus": "default (Python standard library)" if args.data is None else args.data,
                               "block_size": plan.block_size, "plan": plan.to_dict(), "autoencoder": ae_report,
                               "stages": {}, "models": {}}
    for kind, stage in plan.stages.items():  # what each stage achieved against what the plan measured
        last = next((r for r in reversed(read_metrics(out / kind / "metrics.jsonl")) if r.get("type") == "train"), {})
        steps, seconds = last.get("step", 0), last.get("train_seconds", 0.0)
        tps = last.get("tokens", 0) / seconds if seconds else 0.0
        summary["stages"][kind] = {"steps": steps, "train_minutes": round(seconds / 60, 2), "tokens_per_s": tps,
                                   "mfu": stage.mfu * tps / stage.tokens_per_s if stage.mfu else None}
    models = {name: load(out / name, device=str(device)) for name in ("calm", "baseline")}
    for name, model in models.items():
        last = last_eval(out / name / "metrics.jsonl") or {}
        summary["models"][name] = {
            "brierlm": last["brierlm"], **{f"brier_{n}": last[f"brier_{n}"] for n in range(1, 5)},
            "brier_tokens": last["brier_tokens"], "val_loss": last.get("val_loss"), "train_steps": last["step"],
            "train_minutes": round(last.get("train_seconds", 0.0) / 60, 2),
            "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder."))}
    calm_b, base_b = summary["models"]["calm"]["brierlm"], summary["models"]["baseline"]["brierlm"]
    summary["calm_over_baseline_brierlm"] = calm_b / base_b if base_b > 0 else None

    _stage("6/6 samples")
    summary["samples"] = {name: {} for name in models}
    for name, model in models.items():
        for t in (1.0, 0.5):  # CALM at T < 1: the batch approximation over a pool of 200 draws
            ids = model.generate(tok.encode(PROMPT), max_new_tokens=48, num_samples=2, seed=args.seed, temperature=t)
            summary["samples"][name][f"T={t:g}"] = [tok.decode(row.tolist()) for row in ids]
    summary["elapsed_minutes"] = round((time.perf_counter() - t0) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"\nrun folder: {out}  (summary.json, autoencoder_accuracy.png, */checkpoint, */metrics.jsonl)")
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    ae = summary["autoencoder"]
    acc = ae["token_accuracy"]
    lines = ["\n== summary ==",
             f"autoencoder: token accuracy {100 * acc['0.0']:.2f}% (sigma 0), {100 * acc['0.3']:.2f}% (sigma 0.3), "
             f"{ae['active_dims']}/{ae['latent_size']} active dims",
             f"{'model':<10} {'params':>10} {'steps':>7} {'minutes':>8} {'BrierLM':>8}  Brier-1..4"]
    for name, m in summary["models"].items():
        briers = " ".join(f"{m[f'brier_{n}']:.3f}" for n in range(1, 5))
        lines.append(f"{name:<10} {m['parameters']:>10,} {m['train_steps']:>7} {m['train_minutes']:>8.2f} "
                     f"{m['brierlm']:>8.2f}  {briers}")
    ratio = summary["calm_over_baseline_brierlm"]
    lines.append(f"CALM / baseline BrierLM: {ratio:.2f} (same training time, data, tokenizer and validation tokens: "
                 f"{summary['models']['calm']['brier_tokens']} tokens in blocks of {summary['block_size']})"
                 if ratio is not None else "")
    for name, by_t in summary["samples"].items():
        for t, texts in by_t.items():
            note = " (batch approximation, 200 draws)" if name == "calm" and t != "T=1" else ""
            lines.append(f"\n--- {name} sample, {t}{note} ---\n{texts[0]}")
    lines.append(f"\n{summary['elapsed_minutes']} minutes of a {summary['minutes_budget']:g}-minute budget "
                 f"(precision {summary['precision']})")
    return "\n".join(lines)

