"""Analytic parameter and FLOP counts for CALM and the discrete baseline, from a config alone.

Conventions (docs/flops.md gives the derivation and the comparison with the paper's Table 1):
- a multiply-accumulate is 2 FLOPs; only matrix products are counted. Embedding lookups, norms,
  activations, biases, RoPE, softmax and the energy-score distances are left out (< 1 % at paper sizes);
- attention scores and values cost 2·2·n·d per layer and position for a window of n positions, with
  every position charged the full window (no causal halving) — the convention that reproduces the
  paper's Table 1 (Transformer-S 4.4e8, CALM-M 2.9e8 inference FLOPs per token);
- training = forward + backward = 3 × forward for trained parts; the frozen autoencoder encoder, which
  turns CALM's target chunks into posteriors, runs forward only (1 ×);
- every figure is per token: a CALM step (one chunk) is divided by K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

from ..config import AutoencoderConfig, BackboneConfig, BaselineConfig, CALMConfig
from ..errors import ConfigError

AnyConfig = Union[AutoencoderConfig, BaselineConfig, CALMConfig]

# FLOPs for one multiply-accumulate in a forward pass, and the forward+backward multiple for trained parts.
MAC = 2
TRAIN_MULTIPLIER = 3
TIME_FREQUENCIES = 256  # sinusoidal frequencies of the flow/diffusion time embedding


# Weight-matrix sizes (multiply-accumulates per row = parameters of the matrix, without biases).

def _backbone_layer_macs(cfg: BackboneConfig) -> int:
    """q,k,v,o projections and the SwiGLU MLP of one decoder layer, per position."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_kv_heads * cfg.head_dim
    return d * d + 2 * d * kv + d * d + 3 * d * i


def _attention_macs(cfg: BackboneConfig, positions: int) -> int:
    """QK^T and attention·V over a window of ``positions``, per query position and all layers.

    Query heads × head_dim = d whatever the KV grouping, so GQA does not reduce this term."""
    return 2 * cfg.num_layers * positions * cfg.hidden_size


def _compression_macs(cfg: CALMConfig) -> int:
    d, k = cfg.hidden_size, cfg.chunk_size
    return k * d * 2 * d + 2 * d * d


def head_network_calls(cfg: CALMConfig) -> int:
    """Network evaluations per generated sample: energy 1, flow flow_steps (midpoint: 2 per step, so an odd
    count is rounded down), diffusion diffusion_sample_steps."""
    if cfg.head == "flow":
        return 2 * (cfg.flow_steps // 2) if cfg.flow_solver == "midpoint" else cfg.flow_steps
    if cfg.head == "diffusion":
        return cfg.diffusion_sample_steps
    return 1


def _head_out(cfg: CALMConfig) -> int:
    return 2 * cfg.latent_size if cfg.head == "diffusion" else cfg.latent_size  # diffusion: ε and variance


def _head_macs(cfg: CALMConfig) -> tuple[int, int]:
    """(once per position, per network call). Energy: hidden_embd once; noise path, blocks, final per draw.
    Flow/diffusion: cond_embed once; input_proj, time embedding, adaLN blocks and final layer per call."""
    d, s, l = cfg.hidden_size, cfg.noise_size, cfg.latent_size
    if cfg.head == "energy":
        block = 2 * d * d + d * d + d * 2 * d + d * d
        per_sample = s * d + cfg.num_head_blocks * block + d * d + d * l
        return d * d, per_sample
    block = 2 * d * d + 3 * d * d  # MLP + (shift, scale, gate) modulation
    per_call = l * d + TIME_FREQUENCIES * d + d * d + cfg.num_head_blocks * block + 2 * d * d + d * _head_out(cfg)
    return d * d, per_call


def _head_params(cfg: CALMConfig) -> int:
    d = cfg.hidden_size
    once, per_call = _head_macs(cfg)
    if cfg.head == "energy":
        n_biases = d + d + cfg.num_head_blocks * (d + d + 2 * d + d) + d + cfg.latent_size
        n_norms = 2 * (2 + cfg.num_head_blocks + 1) * d  # hidden, noise, one per block, final (w + b)
        return once + per_call + n_biases + n_norms
    # biases: time MLP (2d), cond_embed, input_proj, per block (in_ln w+b, 2 MLP, 3d modulation), final (2d + out)
    n_biases = 2 * d + d + d + cfg.num_head_blocks * (2 * d + 2 * d + 3 * d) + 2 * d + _head_out(cfg)
    return once + per_call + n_biases


def _ae_layer_macs(ae: AutoencoderConfig) -> int:
    return 3 * ae.hidden_size * ae.intermediate_size


def _encoder_macs(ae: AutoencoderConfig) -> int:
    """Encoder per chunk: E/2 layers on each of K tokens, squeeze, E/2 layers, Linear a→2l."""
    a, k, half = ae.hidden_size, ae.chunk_size, ae.num_encoder_layers // 2
    return k * half * _ae_layer_macs(ae) + k * a * a + half * _ae_layer_macs(ae) + a * 2 * ae.latent_size


def _decoder_macs(ae: AutoencoderConfig) -> int:
    """Decoder per chunk: Linear l→a, D/2 layers, expand, D/2 layers on each of K tokens, K·(a→V) logits."""
    a, k, half = ae.hidden_size, ae.chunk_size, ae.num_decoder_layers // 2
    return (ae.latent_size * a + half * _ae_layer_macs(ae) + a * k * a + k * half * _ae_layer_macs(ae)
            + k * a * ae.vocab_size)


def _backbone_params(cfg: BackboneConfig) -> dict[str, int]:
    d = cfg.hidden_size
    per_layer = _backbone_layer_macs(cfg) + 2 * d  # + two RMSNorm weights
    return {"embedding": cfg.vocab_size * d, "backbone": cfg.num_layers * per_layer + d}


def _autoencoder_params(ae: AutoencoderConfig) -> dict[str, int]:
    a, j, l, k = ae.hidden_size, ae.intermediate_size, ae.latent_size, ae.chunk_size
    layer = 3 * a * j + a  # SwiGLU + RMSNorm weight
    encoder = ae.num_encoder_layers * layer + (k * a * a + a) + a + (a * 2 * l + 2 * l)
    decoder = (l * a + a) + ae.num_decoder_layers * layer + (a * k * a + k * a) + a
    # the decoder's output projection is the encoder's embedding (tied), counted once
    return {"embedding": ae.vocab_size * a, "encoder": encoder, "decoder": decoder}


def count_parameters(config: AnyConfig) -> dict[str, int]:
    """Parameters by component, computed from the config (no model is built).

    ``total`` is the figure the paper reports: for CALM it leaves out the frozen autoencoder (CALM-M:
    371,731,584), which is listed as ``autoencoder`` and included in ``total_with_autoencoder``. The
    other entries (all but those three) sum to ``total``."""
    if isinstance(config, AutoencoderConfig):
        out = _autoencoder_params(config)
    elif isinstance(config, CALMConfig):
        d = config.hidden_size
        out = _backbone_params(config)
        out["input_compression"] = (config.chunk_size * d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d
        out["generative_head"] = _head_params(config)
    elif isinstance(config, BaselineConfig):
        out = _backbone_params(config)
        out["lm_head"] = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    else:
        raise ConfigError(f"cannot count parameters of {type(config).__name__}; expected a CALM, baseline "
                          "or autoencoder config")
    out["total"] = sum(out.values())
    if isinstance(config, CALMConfig):
        out["autoencoder"] = sum(_autoencoder_params(config.autoencoder).values())
        out["total_with_autoencoder"] = out["total"] + out["autoencoder"]
    return out


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per token by component, for training (per training token) or inference (per generated token)."""

    mode: str  # "training" or "inference"
    family: str  # "calm" or "baseline"
    tokens_per_step: int  # K for CALM (one step = one chunk), 1 for the baseline
    context_length: int  # tokens in the attention window
    context_positions: int  # backbone positions in the window: ceil(context_length / K)
    components: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # multipliers used (num_samples, head_draws...)

    @property
    def total(self) -> float:
        return float(sum(self.components.values()))

    @property
    def per_step(self) -> float:
        """FLOPs of one autoregressive step (one chunk for CALM, one token for the baseline)."""
        return self.total * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "family": self.family, "tokens_per_step": self.tokens_per_step,
                "context_length": self.context_length, "context_positions": self.context_positions,
                "components": dict(self.components), "total": self.total, "per_step": self.per_step,
                **({"notes": dict(self.notes)} if self.notes else {})}


def _lm_window(config: AnyConfig, context_length: int | None) -> tuple[BaselineConfig | CALMConfig, int, int, int]:
    """(config, K, context in tokens, context in backbone positions); the default is the full trained window."""
    if isinstance(config, AutoencoderConfig):
        raise ConfigError("FLOPs per token are defined for language models (a 'calm' or 'baseline' config); "
                          "an autoencoder config only has a parameter count")
    if not isinstance(config, (CALMConfig, BaselineConfig)):
        raise ConfigError(f"expected a CALM or baseline config, got {type(config).__name__}")
    k = config.chunk_size if isinstance(config, CALMConfig) else 1
    if context_length is None:
        context_length = config.max_position_embeddings * k
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise ConfigError(f"context_length must be a positive number of tokens, got {context_length!r}")
    return config, k, context_length, math.ceil(context_length / k)


def _step_flops(cfg: BaselineConfig | CALMConfig, positions: int, flops_per_mac: int) -> dict[str, float]:
    """The components of one step that both modes share (all but CALM's head and autoencoder)."""
    step = {"backbone": flops_per_mac * cfg.num_layers * _backbone_layer_macs(cfg),
            "attention": flops_per_mac * _attention_macs(cfg, positions)}
    if isinstance(cfg, CALMConfig):
        step["input_compression"] = flops_per_mac * _compression_macs(cfg)
    else:
        step["lm_head"] = flops_per_mac * cfg.hidden_size * cfg.vocab_size
    return step


def _aid_flops(cfg: CALMConfig) -> dict[str, float]:
    """Training FLOPs per step of the training aids (models/aids.py), averaged over the run: they are computed for
    the first ``aid_until`` of it. The frozen decoder of the decoder cross-entropy runs forward and passes the
    gradient back to the head's sample (2 × forward); the aid heads are trained (3 ×); the head-mean regression
    reuses the energy loss's samples (no matrix product)."""
    d, k, v = cfg.hidden_size, cfg.chunk_size, cfg.vocab_size
    t, share, out = TRAIN_MULTIPLIER * MAC, cfg.aid_until, {}
    if cfg.aux_token_weight > 0:
        out["aux_token_head"] = share * t * (d * k * d + k * d * v)
    if cfg.aux_latent_weight > 0:
        out["aux_latent_head"] = share * t * d * cfg.latent_size
    if cfg.decoder_ce_weight > 0:
        out["decoder_ce"] = share * 2 * MAC * _decoder_macs(cfg.autoencoder)
    return out


def inference_flops_per_token(config: AnyConfig, context_length: int | None = None,
                              head_draws: int = 1) -> FlopsReport:
    """Forward FLOPs per generated token with a KV cache holding ``context_length`` tokens.

    ``context_length`` defaults to the trained window (max_position_embeddings backbone positions, i.e.
    ×K tokens for CALM). For CALM, ``head_draws`` counts generative-head samples per step (1 for plain
    sampling; more for likelihood-free temperature sampling), each costing ``head_network_calls`` network
    evaluations (energy 1, flow 20, diffusion 100 by default); each step also decodes its chunk with the
    autoencoder decoder (K tokens of logits) so the tokens can be fed back."""
    cfg, k, ctx, pos = _lm_window(config, context_length)
    if isinstance(head_draws, bool) or not isinstance(head_draws, int) or head_draws < 1:
        raise ConfigError(f"head_draws must be a positive integer, got {head_draws!r}")
    step = _step_flops(cfg, pos, MAC)
    notes: dict[str, Any] = {}
    if isinstance(cfg, CALMConfig):
        once, per_call = _head_macs(cfg)
        calls = head_network_calls(cfg)
        step["generative_head"] = MAC * (once + head_draws * calls * per_call)
        step["autoencoder_decoder"] = MAC * _decoder_macs(cfg.autoencoder)
        notes = {"head_draws": head_draws, "head": cfg.head, "head_network_calls": calls}
    return FlopsReport("inference", cfg.kind, k, ctx, pos, {n: v / k for n, v in step.items()}, notes)


def training_flops_per_token(config: AnyConfig, context_length: int | None = None) -> FlopsReport:
    """Forward + backward FLOPs per training token for sequences of ``context_length`` tokens.

    Trained parts cost 3 × forward. For CALM the generative head runs once per model sample (energy: num_samples)
    or posterior target (flow/diffusion: num_targets) at every position, its condition embedding once, and the
    frozen autoencoder encoder runs forward only on every target chunk."""
    cfg, k, ctx, pos = _lm_window(config, context_length)
    t = TRAIN_MULTIPLIER * MAC
    step = _step_flops(cfg, pos, t)
    notes: dict[str, Any] = {}
    if isinstance(cfg, CALMConfig):
        once, per_call = _head_macs(cfg)  # one call per model draw (energy) or per posterior target (flow/diffusion)
        step["generative_head"] = t * (once + cfg.training_head_calls * per_call)
        step["autoencoder_encoder"] = MAC * _encoder_macs(cfg.autoencoder)  # frozen: forward only
        notes["num_samples" if cfg.head == "energy" else "num_targets"] = cfg.training_head_calls
        step.update(_aid_flops(cfg))
        if cfg.uses_aids:
            notes["aid_until"] = cfg.aid_until
    return FlopsReport("training", cfg.kind, k, ctx, pos, {n: v / k for n, v in step.items()}, notes)


def summarize(config: AnyConfig, context_length: int | None = None, head_draws: int = 1) -> dict[str, Any]:
    """Parameters and both FLOP reports as plain data (what ``calm flops --json`` prints)."""
    out: dict[str, Any] = {"kind": config.kind, "parameters": count_parameters(config)}
    if not isinstance(config, AutoencoderConfig):
        out["training_flops_per_token"] = training_flops_per_token(config, context_length).to_dict()
        out["inference_flops_per_token"] = inference_flops_per_token(config, context_length, head_draws).to_dict()
    return out


def autoencoder_training_flops_per_token(ae: AutoencoderConfig) -> float:
    """Forward + backward FLOPs per training token of the autoencoder (encoder + decoder, 3 × forward), the
    cost ``calm compare`` adds to a CALM run's, as the paper counts it."""
    return TRAIN_MULTIPLIER * MAC * (_encoder_macs(ae) + _decoder_macs(ae)) / ae.chunk_size
