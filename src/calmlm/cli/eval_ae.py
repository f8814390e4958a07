"""`calm eval-ae`: reconstruction accuracy of an autoencoder under latent noise, plus a PNG plot."""

from __future__ import annotations

import argparse
import json

from ..errors import CalmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-ae", help="evaluate an autoencoder: accuracy vs latent noise, active dimensions",
                       description="Token and whole-chunk accuracy with Gaussian noise sigma added to the posterior "
                                   "mean, on held-out data (default: the validation split it was trained with).")
    p.add_argument("--model", required=True, help="autoencoder run folder / checkpoint / Hub id")
    p.add_argument("--data", default=None, help="evaluation corpus (default: the model's validation split)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.5")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-blocks", type=int, default=200)
    p.add_argument("--plot", default=None, help="write a PNG of accuracy against sigma here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def evaluation_blocks(model_path: str, model: object, data: str | None, text_field: str, block_size: int):
    from ..checkpoint import read_metadata
    from ..data import prepare_corpus
    from ..loading import resolve

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise CalmError(f"{model_path} holds no tokenizer; it is needed to tokenise the evaluation data")
    cache = "~/.cache/calmlm/tokens"
    if data is not None:
        blocks, _, _ = prepare_corpus(data, tok, cache, block_size, val_fraction=0.0, text_field=text_field)
        return blocks
    try:
        record = read_metadata(resolve(model_path)).get("data")
    except Exception:
        record = None
    if not record:
        raise CalmError(f"{model_path} records no training data, so there is no default validation split; "
                        "pass --data")
    _, val, _ = prepare_corpus(record.get("spec"), tok, record.get("cache_dir", cache), block_size,
                               record.get("val_fraction", 0.02), record.get("seed", 0),
                               val_data=record.get("val_data"), text_field=record.get("text_field", "text"))
    return val


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_autoencoder, format_autoencoder_report
    from ..loading import load

    model = load(args.model, device=args.device or "cpu", kind="autoencoder")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        raise CalmError(f"--sigmas must be comma-separated numbers, got {args.sigmas!r}") from None
    blocks = evaluation_blocks(args.model, model, args.data, args.text_field, args.block_size)
    r = evaluate_autoencoder(model, blocks, sigmas=sigmas, max_blocks=args.max_blocks)
    if args.plot:
        from ..plotting import plot_accuracy_vs_noise
        plot_accuracy_vs_noise(r, args.plot)
        r["plot"] = args.plot
    print(json.dumps(r, indent=2) if args.json else format_autoencoder_report(r))
    return 0
