"""``calm flops``: parameters and FLOPs per token of a preset, a config file or a checkpoint directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import HEAD_TYPES, AutoencoderConfig, BaselineConfig, CALMConfig, load_config, preset, preset_names
from ..errors import ConfigError
from ..evaluation.flops import summarize


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "flops", help="parameters and training/inference FLOPs per token (analytic, no model is built)",
        description="Count parameters and FLOPs per token from a config: training FLOPs per training token "
                    "(forward + backward) and inference FLOPs per generated token, by component. "
                    "Conventions: docs/flops.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name: calm-m, calm-l, calm-xl, transformer-s/m/l, base, small, "
                                      "debug (the last three exist in both families; see --family)")
    src.add_argument("--config", type=Path, metavar="FILE", help="a config JSON file (as written by calmlm)")
    src.add_argument("--model", type=Path, metavar="DIR", help="a model/checkpoint directory with config.json")
    p.add_argument("--family", choices=("calm", "baseline"),
                   help="model family of --preset, for names both families have (default: calm)")
    p.add_argument("--context", type=int, metavar="TOKENS",
                   help="attention window in tokens (default: the trained window, max_position_embeddings "
                        "backbone positions, i.e. x K tokens for CALM)")
    p.add_argument("--head", choices=HEAD_TYPES, default=None,
                   help="CALM: the generative head (default: the config's; presets use energy). The flow and "
                        "diffusion heads cost 20 and 100 network calls per sample")
    p.add_argument("--head-draws", type=int, default=1, metavar="N",
                   help="CALM: generative-head samples per generated chunk at inference (default 1)")
    p.add_argument("--train-tokens", type=float, metavar="N",
                   help="also print the total training FLOPs for N training tokens (e.g. 5e11)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def resolve_preset(name: str, family: str | None = None) -> BaselineConfig | CALMConfig:
    """A preset by name; a name both families define (base, small, debug) is CALM unless ``family`` says."""
    families = [f for f in ("calm", "baseline") if name.lower() in preset_names(f)]
    if not families:
        raise ConfigError(f"unknown preset {name!r}; CALM presets: {', '.join(sorted(preset_names('calm')))}; "
                          f"baseline presets: {', '.join(sorted(preset_names('baseline')))}")
    if family is None:
        family = families[0]  # "calm" first, so shared names default to CALM
    elif family not in families:
        raise ConfigError(f"there is no {family} preset {name!r}; it is a {families[0]} preset "
                          f"(drop --family or use --family {families[0]})")
    return preset(family, name)  # type: ignore[return-value]


def _load(args: argparse.Namespace) -> tuple[str, AutoencoderConfig | BaselineConfig | CALMConfig]:
    if args.preset is not None:
        return args.preset, resolve_preset(args.preset, args.family)
    if args.family is not None:
        raise ConfigError("--family only applies to --preset (a config file names its own kind)")
    if args.model is not None:
        if not args.model.is_dir():
            raise ConfigError(f"no model directory at {args.model}")
        if not (args.model / "config.json").is_file():
            raise ConfigError(f"{args.model} has no config.json; pass a calmlm model directory "
                              "(or convert a released checkpoint with `calm convert` first)")
        from ..io.checkpoint import model_config  # torch-free until a checkpoint is read

        _refuse_reference_config(args.model / "config.json")
        return str(args.model), model_config(args.model)  # a checkpoint's extra keys are metadata
    if args.config.is_dir():
        raise ConfigError(f"{args.config} is a directory; use --model for a model directory")
    _refuse_reference_config(args.config)
    return str(args.config), load_config(args.config)


def _refuse_reference_config(path: Path) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # load_config and model_config report missing and corrupt files
    if isinstance(data, dict) and "kind" not in data and ("architectures" in data or "model_type" in data):
        raise ConfigError(f"{path} is a Hugging Face config of a released/reference checkpoint, not a calmlm "
                          "config; convert the checkpoint with `calm convert` first")


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_table(name: str, summary: dict[str, Any], train_tokens: float | None = None) -> str:
    params = summary["parameters"]
    lines = [f"{name} ({summary['kind']})", "", f"{'parameters':<28}{'count':>16}"]
    totals = ("total", "autoencoder", "total_with_autoencoder")
    for key, value in params.items():
        if key not in totals:
            lines.append(f"  {key:<26}{value:>16,}")
    lines.append(f"  {'total':<26}{params['total']:>16,}  ({_count(params['total'])})")
    if "autoencoder" in params:
        lines.append(f"  {'autoencoder (frozen)':<26}{params['autoencoder']:>16,}  ({_count(params['autoencoder'])})")
        lines.append(f"  {'total with autoencoder':<26}{params['total_with_autoencoder']:>16,}")
    if "training_flops_per_token" not in summary:
        return "\n".join(lines + ["", "(an autoencoder alone has no FLOPs-per-token figures)"])

    train, infer = summary["training_flops_per_token"], summary["inference_flops_per_token"]
    k = train["tokens_per_step"]
    window = f"context {train['context_length']} tokens"
    if k > 1:
        window += f" = {train['context_positions']} chunks of K={k}"
    lines += ["", f"FLOPs per token ({window})", f"{'component':<28}{'training':>12}{'inference':>12}"]
    names = list(train["components"]) + [n for n in infer["components"] if n not in train["components"]]
    for n in names:
        cells = [f"{r['components'][n]:>12.3e}" if n in r["components"] else f"{'-':>12}" for r in (train, infer)]
        lines.append(f"  {n:<26}{''.join(cells)}")
    lines.append(f"  {'total':<26}{train['total']:>12.3e}{infer['total']:>12.3e}")
    if k > 1:
        lines.append(f"  {'per step (chunk)':<26}{train['per_step']:>12.3e}{infer['per_step']:>12.3e}")
    extra = {**train.get("notes", {}), **infer.get("notes", {})}
    if extra:
        lines.append("  (" + ", ".join(f"{key}={v}" for key, v in extra.items()) + ")")
    if train_tokens is not None:
        lines += ["", f"training FLOPs for {train_tokens:.3g} tokens: {train['total'] * train_tokens:.3e}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.train_tokens is not None and not args.train_tokens > 0:
        raise ConfigError(f"--train-tokens must be positive, got {args.train_tokens}")
    name, config = _load(args)
    if args.head is not None:
        if not isinstance(config, CALMConfig):
            raise ConfigError(f"--head applies to CALM models; {name} is a {config.kind} config")
        config = config.replace(head=args.head)
    summary = summarize(config, context_length=args.context, head_draws=args.head_draws)
    if args.json:
        if args.train_tokens is not None and "training_flops_per_token" in summary:
            summary["train_tokens"] = args.train_tokens
            summary["training_flops_total"] = summary["training_flops_per_token"]["total"] * args.train_tokens
        print(json.dumps({"name": name, **summary}, indent=2))
    else:
        print(format_table(name, summary, args.train_tokens))
    return 0
