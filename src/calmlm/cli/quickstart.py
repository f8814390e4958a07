"""`calm quickstart`: the whole CALM pipeline on the embedded default corpus within a time budget.

tokenizer -> autoencoder (+ robustness evaluation and plot) -> CALM and the baseline (equal time each)
-> BrierLM of both -> generated samples, all in one run folder with a summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import workflows as wf
from ..trainer import TrainConfig

# Share of the budget for each stage; the rest goes to evaluation and samples.
SHARES = {"autoencoder": 0.32, "calm": 0.25, "baseline": 0.25}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on the default corpus (tokenizer, autoencoder, "
                                          "CALM, baseline, evaluation, samples)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--minutes", type=float, default=15.0, help="total time budget")
    p.add_argument("--data", default=None, help="corpus (default: the Python standard library)")
    p.add_argument("--size", choices=["debug", "small", "base"], default="small", help="model presets")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--brier-tokens", type=int, default=16384, help="validation tokens scored by BrierLM")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _stage(name: str) -> None:
    print(f"\n== {name} ==", flush=True)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_autoencoder, format_autoencoder_report
    from ..generation import generate
    from ..loading import load
    from ..metrics import evaluate_brierlm

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = wf.DataOptions(data=args.data, block_size=args.block_size, seed=args.seed,
                          cache_dir=str(out / "token_cache"))
    budget = args.minutes * 60

    def cfg(stage: str) -> TrainConfig:
        return TrainConfig(lr=args.lr, schedule="constant", warmup_steps=100, batch_size=args.batch_size,
                           max_steps=10**7, eval_every=0, save_every=200, seed=args.seed, block_size=args.block_size,
                           time_budget_s=SHARES[stage] * budget, out_dir=str(out / stage), progress=not args.no_progress)

    _stage("1/5 tokenizer + autoencoder")
    ae_preset = {"debug": "debug", "small": "small", "base": "default"}[args.size]
    wf.train_autoencoder(opts, cfg("autoencoder"), preset=ae_preset, device=args.device)
    ae = load(out / "autoencoder", kind="autoencoder")
    _, val, _ = wf.prepare_data(opts, ae.tokenizer)
    ae_report = evaluate_autoencoder(ae, val, max_blocks=200)
    print(format_autoencoder_report(ae_report))
    try:
        from ..plotting import plot_accuracy_vs_noise
        plot_accuracy_vs_noise(ae_report, out / "autoencoder_accuracy.png")
    except Exception as e:  # matplotlib is optional
        print(f"(no plot: {e})")

    _stage("2/5 CALM")
    wf.train_calm(opts, cfg("calm"), str(out / "autoencoder"), preset=args.size, device=args.device,
                  brier_tokens=args.brier_tokens)
    _stage("3/5 baseline")
    wf.train_baseline(opts, cfg("baseline"), tokenizer=str(out / "autoencoder"), preset=args.size,
                      device=args.device, brier_tokens=args.brier_tokens)

    _stage("4/5 evaluation (BrierLM on the validation split)")
    summary: dict = {"minutes_budget": args.minutes, "corpus": "default (Python standard library)"
                     if args.data is None else args.data, "block_size": args.block_size,
                     "autoencoder": ae_report, "models": {}}
    models = {}
    for name in ("calm", "baseline"):
        model = load(out / name)
        models[name] = model
        r = evaluate_brierlm(model, val, block_size=args.block_size, max_tokens=args.brier_tokens, seed=args.seed,
                             progress=not args.no_progress)
        last = _last_eval(out / name / "metrics.jsonl")
        summary["models"][name] = {"brierlm": r["brierlm"], **{f"brier_{n}": r[f"brier_{n}"] for n in range(1, 5)},
                                   "brier_tokens": r["num_tokens"], "val_loss": last.get("val_loss"),
                                   "train_steps": last.get("step"),
                                   "parameters": sum(p.numel() for n, p in model.named_parameters()
                                                     if not n.startswith("autoencoder."))}

    _stage("5/5 samples")
    tok = ae.tokenizer
    prompt = "def "
    samples = {}
    for name, model in models.items():
        ids = generate(model, tok.encode(prompt), max_new_tokens=48, num_samples=2, seed=args.seed)
        samples[name] = [tok.decode(row.tolist()) for row in ids]
    summary["samples"] = samples
    summary["elapsed_minutes"] = round((time.time() - t0) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n== summary ==")
    acc = ae_report["token_accuracy"]
    print(f"autoencoder: token accuracy {100 * acc['0.0']:.2f}% (sigma 0), {100 * acc['0.3']:.2f}% (sigma 0.3), "
          f"{ae_report['active_dims']}/{ae_report['latent_size']} active dims")
    print(f"{'model':<10} {'params':>10} {'steps':>7} {'val loss':>10} {'BrierLM':>8}  Brier-1..4")
    for name, m in summary["models"].items():
        vl = f"{m['val_loss']:.3f}" if isinstance(m["val_loss"], (int, float)) else "-"
        briers = " ".join(f"{m[f'brier_{n}']:.3f}" for n in range(1, 5))
        print(f"{name:<10} {m['parameters']:>10,} {m['train_steps'] or '-':>7} {vl:>10} {m['brierlm']:>8.2f}  {briers}")
    print("(val loss: energy loss for CALM, cross-entropy for the baseline: not comparable; BrierLM is. "
          f"BrierLM over {summary['models']['calm']['brier_tokens']} validation tokens, block {args.block_size})")
    for name, texts in samples.items():
        print(f"\n--- {name} sample ---\n{texts[0]}")
    print(f"\nrun folder: {out}  (summary.json, */checkpoint, */metrics.jsonl); "
          f"{summary['elapsed_minutes']} minutes")
    return 0


def _last_eval(path: Path) -> dict:
    last: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "eval":
                last = rec
    return last
