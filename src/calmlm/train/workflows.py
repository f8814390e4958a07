"""The three training jobs (autoencoder, CALM, baseline) as functions the CLI and the quickstart share.

Each writes a run folder: ``checkpoint/`` (weights, config with the data it was trained on, tokenizer,
training state), ``metrics.jsonl`` and ``train_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AutoencoderConfig, BaselineConfig, CALMConfig, load_config, preset
from ..errors import ConfigError
from .trainer import Control, TrainConfig, Trainer

DEFAULT_CACHE = "~/.cache/calmlm/tokens"


@dataclass
class DataOptions:
    """The training data; the ``help`` texts are those of the commands' data flags."""

    data: str | None = field(default=None, metadata={"help": "corpus: file, folder, glob, .jsonl, hf:NAME (default: "
                                                             "the Python standard library of this interpreter)"})
    val_data: str | None = field(default=None, metadata={
        "help": "separate validation corpus (default: hold out --val-fraction)"})
    val_fraction: float = field(default=0.02, metadata={"help": "share of the corpus held out for validation"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the text", "show_default": False})
    block_size: int = field(default=256, metadata={"help": "tokens per training block", "show_default": False})
    seed: int = 0
    split_seed: int | None = field(default=None, metadata={
        "help": "seed of the validation split (default: --seed); fix it to compare runs of other training seeds "
                "on the same validation tokens"})
    cache_dir: str = field(default=DEFAULT_CACHE, metadata={"help": "where tokenised corpora are cached",
                                                            "show_default": False})

    @property
    def split(self) -> int:
        """The seed that picks the validation documents."""
        return self.seed if self.split_seed is None else self.split_seed

    def record(self) -> dict[str, Any]:
        """What ``calm eval`` needs to rebuild the validation split."""
        return {"spec": self.data, "val_data": self.val_data, "val_fraction": self.val_fraction,
                "seed": self.split, "text_field": self.text_field, "cache_dir": self.cache_dir}


def prepare_data(opts: DataOptions, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    from ..data.corpus import prepare_corpus
    train, val, info = prepare_corpus(opts.data, tokenizer, opts.cache_dir, opts.block_size, opts.val_fraction,
                                      opts.split, val_data=opts.val_data, text_field=opts.text_field)
    if val is None:
        raise ConfigError("training needs validation data: give --val-data or a --val-fraction above 0")
    return train, val, info


def get_tokenizer(path: str | None, opts: DataOptions, vocab_size: int, out_dir: str | Path) -> Any:
    """Load ``path``, or train a byte-level BPE on the training corpus and save it in the run folder."""
    from ..data.corpus import is_validation, open_corpus
    from ..data.tokenizer import Tokenizer, train_tokenizer

    if path:
        return Tokenizer.load(path)
    saved = Path(out_dir) / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return Tokenizer.load(saved)
    corpus = open_corpus(opts.data, opts.text_field)
    docs = (d for d in corpus if opts.val_data or not is_validation(d, opts.split, opts.val_fraction))
    tok = train_tokenizer(docs, vocab_size=vocab_size)
    tok.save(saved)
    return tok


def _model_config(kind: str, name: str, config_file: str | None, **overrides: Any) -> Any:
    if config_file:
        cfg = load_config(config_file)
        if cfg.kind != kind:
            raise ConfigError(f"{config_file} is a {cfg.kind} config, expected {kind}")
        return cfg.replace(**overrides)
    return preset(kind, name, **overrides)


def _fit(build: Callable[[], Any], tok: Any, opts: DataOptions, cfg: TrainConfig, evaluate_fn: Any, resume: bool,
         device: str | None, control: Control | None) -> dict[str, Any]:
    """Train the model ``build()`` makes on the data of ``opts`` and record that data in the run folder. The data
    is prepared first, so a bad --data fails before a large model is allocated."""
    train, val, info = prepare_data(opts, tok)
    meta = {"data": opts.record(), "data_info": {k: v for k, v in info.items() if k != "cache"}}
    final = Trainer(build(), train, val, cfg, tokenizer=tok, evaluate_fn=evaluate_fn, resume=resume, device=device,
                    metadata=meta).fit(control=control)
    Path(cfg.out_dir, "data_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return final


def autoencoder_eval_fn(max_blocks: int = 32) -> Any:
    import torch

    from ..evaluation.autoencoder import evaluate_autoencoder

    def fn(model: Any, val: Any) -> dict[str, float]:
        # blocks spread over the whole split: its first blocks (one document) can be easier than the rest, which
        # made a run stop at its accuracy target 0.6 points early
        step = -(-len(val) // max_blocks)  # ceil: at most max_blocks, reaching the split's end
        picked = torch.stack([torch.as_tensor(val[i]) for i in range(0, len(val), step)])
        r = evaluate_autoencoder(model, picked, sigmas=(0.0, 0.3))
        return {"token_acc_sigma0": r["token_accuracy"]["0.0"], "token_acc_sigma0.3": r["token_accuracy"]["0.3"],
                "active_dims": r["active_dims"]}
    return fn


def autoencoder_config(tok: Any, preset: str = "default", config_file: str | None = None,
                       **overrides: Any) -> AutoencoderConfig:
    """The autoencoder config a run trains: the preset (or file) with the tokenizer's vocabulary and pad id."""
    from ..data.tokenizer import check_vocab

    cfg: AutoencoderConfig = _model_config("autoencoder", preset, config_file, vocab_size=tok.vocab_size,
                                           mask_token_id=tok.pad_id if tok.pad_id is not None else 0, **overrides)
    check_vocab(tok, cfg.vocab_size, "autoencoder")
    return cfg


def train_autoencoder(opts: DataOptions, cfg: TrainConfig, preset: str = "default", config_file: str | None = None,
                      tokenizer: str | None = None, vocab_size: int = 8192, resume: bool = False,
                      device: str | None = None, control: Control | None = None,
                      **overrides: Any) -> dict[str, Any]:
    """Train an autoencoder; ``overrides`` are AutoencoderConfig fields (e.g. chunk_size)."""
    from ..models.autoencoder import Autoencoder

    tok = get_tokenizer(tokenizer, opts, vocab_size, cfg.out_dir)
    ae_cfg = autoencoder_config(tok, preset, config_file, **overrides)
    return _fit(lambda: Autoencoder(ae_cfg), tok, opts, cfg, autoencoder_eval_fn(), resume, device, control)


def brier_eval_fn(block_size: int, max_tokens: int = 8192) -> Any:
    from ..evaluation.brierlm import make_brierlm_eval_fn
    return make_brierlm_eval_fn(block_size=block_size, batch_size=8, max_tokens=max_tokens)


def load_autoencoder(path: str) -> Any:
    """A trained autoencoder with its tokenizer (CALM is trained on the autoencoder's tokenizer)."""
    from ..io.loading import load

    ae = load(path, kind="autoencoder")
    if getattr(ae, "tokenizer", None) is None:
        raise ConfigError(f"the autoencoder at {path} holds no tokenizer; train it with `calm train-ae`")
    return ae


def calm_config(ae_config: AutoencoderConfig, tok: Any, block_size: int, preset: str = "small",
                config_file: str | None = None, **overrides: Any) -> CALMConfig:
    """The CALM config a run trains: the preset (or file) matched to its autoencoder, tokenizer and block size;
    ``overrides`` are CALMConfig fields (head options...)."""
    k = ae_config.chunk_size
    if block_size % k:
        raise ConfigError(f"--block-size {block_size} is not a multiple of the autoencoder's K={k}")
    over = {"autoencoder": ae_config, "vocab_size": ae_config.vocab_size, "chunk_size": k,
            "latent_size": ae_config.latent_size, "eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id, **overrides}
    if config_file:  # a CALM config file names its own autoencoder; it must match the one given
        over.pop("autoencoder")
    model_cfg: CALMConfig = _model_config("calm", preset, config_file, **over)
    if model_cfg.max_position_embeddings < block_size // k:
        model_cfg = model_cfg.replace(max_position_embeddings=block_size // k)
    return model_cfg


def train_calm(opts: DataOptions, cfg: TrainConfig, autoencoder: str, preset: str = "small",
               config_file: str | None = None, resume: bool = False, device: str | None = None,
               brier_tokens: int = 8192, head_options: dict[str, Any] | None = None,
               control: Control | None = None) -> dict[str, Any]:
    """Train CALM on a frozen autoencoder; ``head_options`` are CALMConfig overrides (head, training aids)."""
    from ..models.calm import CALM

    ae = load_autoencoder(autoencoder)
    model_cfg = calm_config(ae.config, ae.tokenizer, opts.block_size, preset, config_file, **(head_options or {}))
    def build() -> CALM:
        model = CALM(model_cfg, autoencoder=ae)
        model.attach_aids()  # the training aids the config turns on (none in the paper presets)
        return model
    return _fit(build, ae.tokenizer, opts, cfg, brier_eval_fn(opts.block_size, brier_tokens), resume, device, control)


def baseline_config(tok: Any, block_size: int, preset: str = "small", config_file: str | None = None,
                    **overrides: Any) -> BaselineConfig:
    model_cfg: BaselineConfig = _model_config("baseline", preset, config_file, vocab_size=tok.vocab_size,
                                              eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, **overrides)
    if model_cfg.max_position_embeddings < block_size:
        model_cfg = model_cfg.replace(max_position_embeddings=block_size)
    return model_cfg


def train_baseline(opts: DataOptions, cfg: TrainConfig, tokenizer: str | None = None, preset: str = "small",
                   config_file: str | None = None, vocab_size: int = 8192, resume: bool = False,
                   device: str | None = None, brier_tokens: int = 8192,
                   control: Control | None = None) -> dict[str, Any]:
    from ..models.baseline import BaselineLM

    tok = get_tokenizer(_tokenizer_path(tokenizer), opts, vocab_size, cfg.out_dir)
    model_cfg = baseline_config(tok, opts.block_size, preset, config_file)
    return _fit(lambda: BaselineLM(model_cfg), tok, opts, cfg, brier_eval_fn(opts.block_size, brier_tokens), resume,
                device, control)


def _tokenizer_path(path: str | None) -> str | None:
    """Accept a checkpoint or run folder as --tokenizer (to share an autoencoder's tokenizer)."""
    if path is not None:
        for folder in (Path(path) / "checkpoint", Path(path)):
            if (folder / "tokenizer.json").exists():
                return str(folder)
    return path
