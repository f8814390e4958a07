"""The three training jobs (autoencoder, CALM, baseline) as functions the CLI and the quickstart share.

Each writes a run folder: ``checkpoint/`` (weights, config with the data it was trained on, tokenizer,
training state), ``metrics.jsonl`` and ``train_config.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (AutoencoderConfig, BaselineConfig, CALMConfig, autoencoder_preset, baseline_preset,
                     calm_preset, load_config)
from .errors import ConfigError
from .trainer import TrainConfig, Trainer

DEFAULT_CACHE = "~/.cache/calmlm/tokens"


@dataclass
class DataOptions:
    data: str | None = None  # corpus spec; None = the Python standard library
    val_data: str | None = None
    val_fraction: float = 0.02
    text_field: str = "text"
    block_size: int = 256
    seed: int = 0
    cache_dir: str = DEFAULT_CACHE

    def record(self) -> dict[str, Any]:
        """What ``calm eval`` needs to rebuild the validation split."""
        return {"spec": self.data, "val_data": self.val_data, "val_fraction": self.val_fraction,
                "seed": self.seed, "text_field": self.text_field, "cache_dir": self.cache_dir}


def add_data_args(p: argparse.ArgumentParser, block_size: int = 256) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="corpus: file, folder, glob, .jsonl, hf:NAME (default: the Python "
                                                "standard library of this interpreter)")
    g.add_argument("--val-data", default=None, help="separate validation corpus (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=float, default=0.02)
    g.add_argument("--text-field", default="text", help="JSON field holding the text")
    g.add_argument("--block-size", type=int, default=block_size, help="tokens per training block")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where tokenised corpora are cached")


def add_head_args(p: argparse.ArgumentParser, sampling_only: bool = False) -> None:
    """The generative head's options (CALMConfig fields); None keeps the preset's / checkpoint's value."""
    from .config import FLOW_SOLVERS, HEAD_TYPES

    g = p.add_argument_group("generative head (CALM)")
    if not sampling_only:
        g.add_argument("--head", choices=HEAD_TYPES, default=None,
                       help="energy (default; one network call per sample), flow (flow matching) or diffusion")
    g.add_argument("--flow-steps", type=int, default=None, metavar="N",
                   help="flow head: network calls per sample (default 20; the midpoint solver takes N/2 steps)")
    g.add_argument("--flow-solver", choices=FLOW_SOLVERS, default=None, help="flow head: ODE solver (default midpoint)")
    if not sampling_only:
        g.add_argument("--diffusion-steps", type=int, default=None, metavar="T",
                       help="diffusion head: training timesteps of the cosine schedule (default 1000)")
    g.add_argument("--diffusion-sample-steps", type=int, default=None, metavar="S",
                   help="diffusion head: reverse steps of the respaced sampling chain (default 100)")


def head_options(args: argparse.Namespace) -> dict[str, Any]:
    """The head options given on the command line, as CALMConfig fields."""
    names = ("head", "flow_steps", "flow_solver", "diffusion_steps", "diffusion_sample_steps")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def apply_head_options(model: Any, args: argparse.Namespace) -> None:
    """Apply --flow-steps / --flow-solver / --diffusion-sample-steps to a loaded CALM model."""
    options = head_options(args)
    if options and getattr(model.config, "kind", None) == "calm":
        model.set_head_options(**options)


def add_train_args(p: argparse.ArgumentParser, lr: float = 1e-3, batch_size: int = 16) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="run folder")
    g.add_argument("--max-steps", type=int, default=2000)
    g.add_argument("--minutes", type=float, default=None, help="stop cleanly (eval + save) after this many minutes")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=batch_size, help="blocks per micro-batch (per GPU)")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--eval-every", type=int, default=500)
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: replicate the model on every GPU (ddp) or shard parameters, gradients "
                        "and optimizer state across them (fsdp, FSDP2) for models that do not fit one GPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue exactly from the run folder's checkpoint")
    g.add_argument("--device", default=None)
    g.add_argument("--no-progress", action="store_true")


def data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(args.data, args.val_data, args.val_fraction, args.text_field, args.block_size,
                       args.seed, args.cache_dir)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, max_steps=args.max_steps, weight_decay=args.weight_decay,
                       eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                       block_size=args.block_size, precision=args.precision, compile=args.compile,
                       distributed=args.distributed,
                       time_budget_s=args.minutes * 60 if args.minutes else None, out_dir=args.out,
                       progress=not args.no_progress)


def prepare_data(opts: DataOptions, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    from .data import prepare_corpus
    train, val, info = prepare_corpus(opts.data, tokenizer, opts.cache_dir, opts.block_size, opts.val_fraction,
                                      opts.seed, val_data=opts.val_data, text_field=opts.text_field)
    if val is None:
        raise ConfigError("training needs validation data: give --val-data or a --val-fraction above 0")
    return train, val, info


def get_tokenizer(path: str | None, opts: DataOptions, vocab_size: int, out_dir: str | Path) -> Any:
    """Load ``path``, or train a byte-level BPE on the training corpus and save it in the run folder."""
    from .data import is_validation, open_corpus
    from .tokenizer import Tokenizer, train_tokenizer

    if path:
        return Tokenizer.load(path)
    saved = Path(out_dir) / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return Tokenizer.load(saved)
    corpus = open_corpus(opts.data, opts.text_field)
    docs = (d for d in corpus if opts.val_data or not is_validation(d, opts.seed, opts.val_fraction))
    tok = train_tokenizer(docs, vocab_size=vocab_size)
    tok.save(saved)
    return tok


def _model_config(kind: str, preset: str, config_file: str | None, **overrides: Any) -> Any:
    if config_file:
        cfg = load_config(config_file)
        if cfg.kind != kind:
            raise ConfigError(f"{config_file} is a {cfg.kind} config, expected {kind}")
        return cfg.replace(**overrides)
    if kind == "autoencoder":
        return autoencoder_preset(preset, **overrides)
    if kind == "baseline":
        return baseline_preset(preset, **overrides)
    return calm_preset(preset, **overrides)


def _fit(model: Any, train: Any, val: Any, cfg: TrainConfig, tok: Any, opts: DataOptions, info: dict[str, Any],
         evaluate_fn: Any, resume: bool, device: str | None) -> dict[str, Any]:
    meta = {"data": opts.record(), "data_info": {k: v for k, v in info.items() if k != "cache"}}
    trainer = Trainer(model, train, val, cfg, tokenizer=tok, evaluate_fn=evaluate_fn, resume=resume, device=device,
                      metadata=meta)
    final = trainer.fit()
    Path(cfg.out_dir, "data_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return final


def autoencoder_eval_fn(max_blocks: int = 32) -> Any:
    from .evaluation import evaluate_autoencoder

    def fn(model: Any, val: Any) -> dict[str, float]:
        r = evaluate_autoencoder(getattr(model, "module", model), val, sigmas=(0.0, 0.3), max_blocks=max_blocks)
        return {"token_acc_sigma0": r["token_accuracy"]["0.0"], "token_acc_sigma0.3": r["token_accuracy"]["0.3"],
                "active_dims": r["active_dims"]}
    return fn


def train_autoencoder(opts: DataOptions, cfg: TrainConfig, preset: str = "default", config_file: str | None = None,
                      tokenizer: str | None = None, vocab_size: int = 8192, resume: bool = False,
                      device: str | None = None) -> dict[str, Any]:
    from .autoencoder import Autoencoder
    from .tokenizer import check_vocab

    tok = get_tokenizer(tokenizer, opts, vocab_size, cfg.out_dir)
    ae_cfg: AutoencoderConfig = _model_config("autoencoder", preset, config_file, vocab_size=tok.vocab_size,
                                              mask_token_id=tok.pad_id if tok.pad_id is not None else 0)
    check_vocab(tok, ae_cfg.vocab_size, "autoencoder")
    train, val, info = prepare_data(opts, tok)
    return _fit(Autoencoder(ae_cfg), train, val, cfg, tok, opts, info, autoencoder_eval_fn(), resume, device)


def brier_eval_fn(block_size: int, max_tokens: int = 8192) -> Any:
    from .metrics import make_brierlm_eval_fn
    return make_brierlm_eval_fn(block_size=block_size, batch_size=8, max_tokens=max_tokens)


def train_calm(opts: DataOptions, cfg: TrainConfig, autoencoder: str, preset: str = "small",
               config_file: str | None = None, resume: bool = False, device: str | None = None,
               brier_tokens: int = 8192, head_options: dict[str, Any] | None = None) -> dict[str, Any]:
    from .calm import CALM
    from .loading import load

    ae = load(autoencoder, kind="autoencoder")
    tok = getattr(ae, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"the autoencoder at {autoencoder} holds no tokenizer; train it with `calm train-ae`")
    a = ae.config
    if opts.block_size % a.chunk_size:
        raise ConfigError(f"--block-size {opts.block_size} is not a multiple of the autoencoder's K={a.chunk_size}")
    over: dict[str, Any] = dict(autoencoder=a, vocab_size=a.vocab_size, chunk_size=a.chunk_size,
                                latent_size=a.latent_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    over.update(head_options or {})  # --head, --flow-steps, ...
    if config_file:  # a CALM config file names its own autoencoder; it must match the one given
        over.pop("autoencoder")
    model_cfg: CALMConfig = _model_config("calm", preset, config_file, **over)
    positions = opts.block_size // a.chunk_size
    if model_cfg.max_position_embeddings < positions:
        model_cfg = model_cfg.replace(max_position_embeddings=positions)
    model = CALM(model_cfg, autoencoder=ae)
    train, val, info = prepare_data(opts, tok)
    return _fit(model, train, val, cfg, tok, opts, info, brier_eval_fn(opts.block_size, brier_tokens), resume, device)


def train_baseline(opts: DataOptions, cfg: TrainConfig, tokenizer: str | None = None, preset: str = "small",
                   config_file: str | None = None, vocab_size: int = 8192, resume: bool = False,
                   device: str | None = None, brier_tokens: int = 8192) -> dict[str, Any]:
    from .baseline import BaselineLM

    tok = get_tokenizer(_tokenizer_path(tokenizer), opts, vocab_size, cfg.out_dir)
    model_cfg: BaselineConfig = _model_config("baseline", preset, config_file, vocab_size=tok.vocab_size,
                                              eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    if model_cfg.max_position_embeddings < opts.block_size:
        model_cfg = model_cfg.replace(max_position_embeddings=opts.block_size)
    train, val, info = prepare_data(opts, tok)
    return _fit(BaselineLM(model_cfg), train, val, cfg, tok, opts, info, brier_eval_fn(opts.block_size, brier_tokens),
                resume, device)


def _tokenizer_path(path: str | None) -> str | None:
    """Accept a checkpoint or run folder as --tokenizer (to share an autoencoder's tokenizer)."""
    if path is None:
        return None
    p = Path(path)
    for cand in (p / "checkpoint", p):
        if (cand / "tokenizer.json").exists():
            return str(cand)
    return path
