"""Typed model configurations, named presets and their JSON form.

A config is plain data: every choice (head type, presets) is a string or a number, so a run folder's
``config.json`` fully describes the model beside its safetensors weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="_Config")


class _Config:
    """JSON (de)serialisation shared by all configs; ``kind`` names the model family on disk."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Config) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ConfigError(f"config is for a {kind!r} model, expected {cls.kind!r}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
        if "autoencoder" in data and isinstance(data["autoencoder"], dict):
            data["autoencoder"] = AutoencoderConfig.from_dict(data["autoencoder"])
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass
class AutoencoderConfig(_Config):
    """The chunk autoencoder of paper §2: K tokens <-> one latent vector of size ``latent_size``."""

    kind: ClassVar[str] = "autoencoder"

    vocab_size: int = 8192
    chunk_size: int = 4  # K, tokens per latent vector
    hidden_size: int = 512
    intermediate_size: int = 1280
    latent_size: int = 128
    num_encoder_layers: int = 2  # half before the squeeze, half after
    num_decoder_layers: int = 2  # half before the expand, half after
    rms_norm_eps: float = 1e-6
    kl_weight: float = 1e-3  # beta
    kl_clamp: float = 0.5  # per-dimension KL floor against posterior collapse
    token_dropout: float = 0.15  # probability of replacing an input token by mask_token_id
    latent_dropout: float = 0.15  # dropout on z
    mask_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "chunk_size", "hidden_size", "intermediate_size", "latent_size")
        if any(n < 2 or n % 2 for n in (self.num_encoder_layers, self.num_decoder_layers)):
            raise ConfigError("num_encoder_layers and num_decoder_layers must be even and >= 2 "
                              "(half run before the squeeze/expand, half after)")
        for name in ("token_dropout", "latent_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} outside the vocabulary [0, {self.vocab_size})")


@dataclass
class BackboneConfig(_Config):
    """The Llama-style decoder shared by CALM and the baseline."""

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048  # in backbone positions: chunks for CALM, tokens for the baseline
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_position_embeddings")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("the head dimension hidden_size/num_heads must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class BaselineConfig(BackboneConfig):
    """A standard next-token Transformer: the discrete counterpart CALM is compared with."""

    kind: ClassVar[str] = "baseline"

    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None


HEAD_TYPES = ("energy", "flow", "diffusion")
FLOW_SOLVERS = ("midpoint", "euler")
AID_SCHEDULES = ("linear", "constant")
AID_CONTROLS = ("none", "detach", "shuffle")
AID_WEIGHTS = ("aux_token_weight", "aux_latent_weight", "head_mean_weight", "decoder_ce_weight")
AID_OPTIONS = (*AID_WEIGHTS, "aid_until", "aid_schedule", "aid_control")
HEAD_SAMPLING_OPTIONS = ("flow_steps", "flow_solver", "diffusion_sample_steps")  # changeable after training
NUM_SAMPLES = 8  # the energy head's model samples N per position (the reference's)
NUM_TARGETS = {"energy": 100, "flow": 8, "diffusion": 8}  # posterior targets M per position (the reference's)


@dataclass
class CALMConfig(BackboneConfig):
    """The next-vector model of paper §3: backbone over chunks + generative head + frozen autoencoder.

    ``head`` picks the generative head: "energy" (the paper's choice, one network call per sample),
    "flow" (flow matching, an ODE solved in ``flow_steps`` network evaluations) or "diffusion"
    (DDPM with learned variance, ``diffusion_steps`` training steps respaced to ``diffusion_sample_steps``)."""

    kind: ClassVar[str] = "calm"

    chunk_size: int = 4  # K; must equal the autoencoder's
    latent_size: int = 128  # l; must equal the autoencoder's
    head: str = field(default="energy", metadata={"choices": HEAD_TYPES, "help": "energy (default; one network call "
                                                  "per sample), flow (flow matching) or diffusion"})
    noise_size: int = 64  # energy head only
    energy_head_init: str = "normal"  # energy head Linears: "normal" N(0, initializer_range) as the reference, or
    # "xavier" (uniform, scaled by fan-in + fan-out, as the reference's flow/diffusion heads): learns the
    # context much sooner at small widths, where 0.02 is far below 1/sqrt(d) (docs/small_scale.md)
    num_head_blocks: int = 4  # residual MLP blocks of the generative head
    num_samples: int | None = None  # the energy head's N model samples per position (None: 8); other heads: None
    flow_steps: int = field(default=20, metadata={"metavar": "N", "help": "flow head: network calls per sample "
                                                  "(default 20; the midpoint solver takes N/2 steps)"})
    flow_solver: str = field(default="midpoint", metadata={"choices": FLOW_SOLVERS,
                                                           "help": "flow head: ODE solver (default midpoint)"})
    diffusion_steps: int = field(default=1000, metadata={
        "metavar": "T", "help": "diffusion head: training timesteps of the cosine schedule (default 1000)"})
    diffusion_sample_steps: int = field(default=100, metadata={
        "metavar": "S", "help": "diffusion head: reverse steps of the respaced sampling chain (default 100)"})
    num_targets: int | None = None  # every head's M posterior targets per position (None: NUM_TARGETS[head])
    energy_alpha: float = 1.0  # exponent of the distances in the energy score, in (0, 2)
    layer_norm_eps: float = 1e-6  # LayerNorms of the input compression and of the head
    # -- training aids (models/aids.py, docs/small_scale.md): training-only losses, never used at inference;
    # their parameters are kept out of the checkpoint. All off (0) in the paper presets.
    aux_token_weight: float = field(default=0.0, metadata={
        "metavar": "W", "help": "training aid: weight of an auxiliary head's cross-entropy on the next chunk's "
                                "K tokens, read from the backbone state (dropped after training; default 0: off)"})
    aux_latent_weight: float = field(default=0.0, metadata={
        "metavar": "W", "help": "training aid: weight of a linear regression of the next chunk's posterior mean "
                                "from the backbone state (mean squared error; default 0: off)"})
    head_mean_weight: float = field(default=0.0, metadata={
        "metavar": "W", "help": "training aid: weight of the squared error between the mean of the head's samples "
                                "and the next chunk's posterior mean (energy head; default 0: off)"})
    decoder_ce_weight: float = field(default=0.0, metadata={
        "metavar": "W", "help": "training aid: weight of the cross-entropy of the next chunk's tokens decoded by "
                                "the frozen decoder from one head sample (energy head; default 0: off)"})
    aid_until: float = field(default=1.0, metadata={
        "metavar": "F", "help": "fraction of training (steps or time budget) after which no aid is computed "
                                "(default 1)"})
    aid_schedule: str = field(default="linear", metadata={
        "choices": AID_SCHEDULES, "help": "aid weights fall linearly to 0 at --aid-until, or stay constant until "
                                          "then (default linear)"})
    aid_control: str = field(default="none", metadata={
        "choices": AID_CONTROLS, "help": "negative controls of the aids: detach (no aid gradient reaches the "
                                         "backbone) or shuffle (targets of other positions) (default none)"})
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEAD_TYPES:
            raise ConfigError(f"unknown generative head {self.head!r}; available: {', '.join(map(repr, HEAD_TYPES))}")
        if self.head != "energy" and self.num_samples is not None:
            raise ConfigError(f"num_samples={self.num_samples} is the energy head's number of model samples; the "
                              f"{self.head} head trains on num_targets posterior targets per position (default "
                              f"{NUM_TARGETS[self.head]}): give num_targets={self.num_samples} instead")
        if self.head == "energy" and self.num_samples is None:
            self.num_samples = NUM_SAMPLES
        if self.num_targets is None:
            self.num_targets = NUM_TARGETS[self.head]
        _positive(self, "chunk_size", "latent_size", "noise_size", "num_head_blocks", "num_targets", "flow_steps",
                  "diffusion_steps", "diffusion_sample_steps")
        if self.head == "energy" and self.num_samples < 2:  # type: ignore[operator]
            raise ConfigError(f"num_samples must be >= 2: the energy score's diversity term needs two samples, got "
                              f"{self.num_samples}")
        if self.energy_head_init not in ("normal", "xavier"):
            raise ConfigError(f"unknown energy_head_init {self.energy_head_init!r}; use 'normal' or 'xavier'")
        if self.flow_solver not in FLOW_SOLVERS:
            raise ConfigError(f"unknown flow_solver {self.flow_solver!r}; available: {', '.join(FLOW_SOLVERS)}")
        if self.flow_solver == "midpoint" and self.flow_steps < 2:
            raise ConfigError("flow_steps must be >= 2 for the midpoint solver (two network calls per step)")
        if self.diffusion_sample_steps > self.diffusion_steps:
            raise ConfigError(f"diffusion_sample_steps {self.diffusion_sample_steps} exceeds diffusion_steps "
                              f"{self.diffusion_steps}: the sampling chain is a subset of the training steps")
        for name in ("aux_token_weight", "aux_latent_weight", "decoder_ce_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 turns the aid off), got {getattr(self, name)}")
        if not 0.0 < self.aid_until <= 1.0:
            raise ConfigError(f"aid_until is a fraction of training in (0, 1], got {self.aid_until}")
        for name, allowed in (("aid_schedule", AID_SCHEDULES), ("aid_control", AID_CONTROLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        for name in ("head_mean_weight", "decoder_ce_weight"):
            if getattr(self, name) > 0 and self.head != "energy":
                raise ConfigError(f"{name} needs the energy head (it reads the energy loss's samples); "
                                  f"the {self.head} head has none")
        if not 0.0 < self.energy_alpha < 2.0:
            raise ConfigError(f"energy_alpha must be in (0, 2) for a strictly proper score, got {self.energy_alpha}")
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderConfig.from_dict(self.autoencoder)
        check_compatible(self, self.autoencoder)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CALMConfig:
        return super().from_dict(upgrade_config_dict(data))

    def replace(self, **changes: Any) -> CALMConfig:
        """A copy with ``changes``. Changing the head keeps the head's network calls per position in training unless
        num_samples/num_targets are given: the energy head's N samples become the flow/diffusion head's M targets
        and back (the reference has one ``num_samples`` for both); the energy head's M returns to its default."""
        if changes.get("head", self.head) != self.head:
            changes = {**head_draws(changes["head"], self.training_head_calls), **changes}
        return super().replace(**changes)

    @property
    def training_head_calls(self) -> int:
        """Network calls of the generative head per position in training: N (energy) or M (flow/diffusion)."""
        return self.num_samples if self.head == "energy" else self.num_targets  # type: ignore[return-value]

    @property
    def uses_aids(self) -> bool:
        """Whether any training aid is on (models/aids.py)."""
        return any(getattr(self, n) > 0 for n in AID_WEIGHTS)


def head_draws(head: str, calls: int | None) -> dict[str, int | None]:
    """num_samples and num_targets of a ``head`` trained with ``calls`` network calls per position (None: its
    defaults): the energy head's N model samples (its M stays the default), the flow/diffusion heads' M targets."""
    if head == "energy":
        return {"num_samples": calls, "num_targets": None}
    return {"num_samples": None, "num_targets": calls}


def upgrade_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict as older calmlm versions wrote it, in today's fields: a flow or diffusion CALM config's
    ``num_samples`` was its number of posterior targets (now ``num_targets``; its ``num_targets`` went unused)."""
    if data.get("kind", "calm") == "calm" and data.get("head") in ("flow", "diffusion") \
            and data.get("num_samples") is not None:
        return {**data, "num_targets": data["num_samples"], "num_samples": None}
    return data


def check_compatible(model: CALMConfig, ae: AutoencoderConfig) -> None:
    """A CALM model only works with an autoencoder of the same K, latent size and vocabulary."""
    problems = []
    if model.chunk_size != ae.chunk_size:
        problems.append(f"chunk size K: model {model.chunk_size}, autoencoder {ae.chunk_size}")
    if model.latent_size != ae.latent_size:
        problems.append(f"latent size: model {model.latent_size}, autoencoder {ae.latent_size}")
    if model.vocab_size != ae.vocab_size:
        problems.append(f"vocabulary: model {model.vocab_size}, autoencoder {ae.vocab_size}")
    if problems:
        raise ConfigError("the CALM model does not match its autoencoder (" + "; ".join(problems) + "). "
                          "Train the model with this autoencoder's chunk_size/latent_size/vocab_size, "
                          "or pass the autoencoder it was built for.")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be positive, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------------------------------------
# Presets. The paper's shapes (Table 1) use the Llama 3 vocabulary of 128256 tokens; head counts for
# the L/XL sizes are not published and do not change parameters or FLOPs.

LLAMA3_VOCAB = 128256

AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(vocab_size=LLAMA3_VOCAB),  # 75M parameters, l=128, K=4
    "default": dict(),  # paper shape with an 8192 BPE vocabulary
    "small": dict(hidden_size=256, intermediate_size=640, latent_size=64),
    "debug": dict(hidden_size=64, intermediate_size=128, latent_size=16, vocab_size=512),
}

_S = dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=16, num_kv_heads=16)
_M = dict(hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16, num_kv_heads=16)
_L = dict(hidden_size=1536, intermediate_size=4096, num_layers=16, num_heads=16, num_kv_heads=16)
_XL = dict(hidden_size=2560, intermediate_size=6880, num_layers=16, num_heads=20, num_kv_heads=20)
_SMALL = dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4)
_DEBUG = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
              max_position_embeddings=256)

BASELINE_PRESETS: dict[str, dict[str, Any]] = {
    "transformer-s": dict(_S, vocab_size=LLAMA3_VOCAB),  # 281M
    "transformer-m": dict(_M, vocab_size=LLAMA3_VOCAB),  # 465M
    "transformer-l": dict(_L, vocab_size=LLAMA3_VOCAB),  # 849M
    "base": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8),
    "small": dict(_SMALL),
    "debug": dict(_DEBUG, vocab_size=512),
}

CALM_PRESETS: dict[str, dict[str, Any]] = {
    "calm-m": dict(_M, vocab_size=LLAMA3_VOCAB, autoencoder="paper"),  # 371M (+75M autoencoder)
    "calm-l": dict(_L, vocab_size=LLAMA3_VOCAB, autoencoder="paper"),  # 735M
    "calm-xl": dict(_XL, vocab_size=LLAMA3_VOCAB, autoencoder="paper"),  # 1.82B
    # small and base train with the latent-regression aid (models/aids.py): +2.1 BrierLM at 400 equal steps of
    # the small CALM, at no measurable cost per step (docs/small_scale.md); it never changes inference
    "base": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8,
                 energy_head_init="xavier", aux_latent_weight=1.0, autoencoder="default"),
    # small: N=4 samples, M=25 targets and one head block make a step 1.6x faster than the paper's 8 / 100 and
    # two blocks and learn nearly as much per step at this scale, so more steps fit a budget (docs/small_scale.md)
    "small": dict(_SMALL, latent_size=64, noise_size=32, num_head_blocks=1, energy_head_init="xavier",
                  num_samples=4, num_targets=25, aux_latent_weight=1.0, autoencoder="small"),
    "debug": dict(_DEBUG, vocab_size=512, latent_size=16, noise_size=16, num_head_blocks=2, autoencoder="debug"),
}


def _preset(table: dict[str, dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    key = name.lower()
    if key not in table:
        raise ConfigError(f"unknown {what} preset {name!r}; available: {', '.join(sorted(table))}")
    return dict(table[key])


def autoencoder_preset(name: str, **overrides: Any) -> AutoencoderConfig:
    return AutoencoderConfig(**{**_preset(AUTOENCODER_PRESETS, name, "autoencoder"), **overrides})


def baseline_preset(name: str, **overrides: Any) -> BaselineConfig:
    return BaselineConfig(**{**_preset(BASELINE_PRESETS, name, "baseline"), **overrides})


def calm_preset(name: str, autoencoder: AutoencoderConfig | None = None, **overrides: Any) -> CALMConfig:
    """A CALM preset; its autoencoder defaults to the matching autoencoder preset (same K, l, vocab)."""
    values = _preset(CALM_PRESETS, name, "CALM")
    ae_name = values.pop("autoencoder")
    head = overrides.get("head", "energy")
    if head != "energy":  # the presets' draws are the energy head's: keep its calls per position (as replace does)
        values.update(head_draws(head, values.pop("num_samples", None)))
    values.update(overrides)
    if autoencoder is None:
        ae_over = {k: values[k] for k in ("vocab_size", "chunk_size", "latent_size") if k in values}
        autoencoder = autoencoder_preset(ae_name, **ae_over)
    values.setdefault("chunk_size", autoencoder.chunk_size)
    values.setdefault("latent_size", autoencoder.latent_size)
    values.setdefault("vocab_size", autoencoder.vocab_size)
    return CALMConfig(autoencoder=autoencoder, **values)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "autoencoder": AUTOENCODER_PRESETS, "calm": CALM_PRESETS, "baseline": BASELINE_PRESETS}


def preset_names(kind: str) -> list[str]:
    """The preset names of a model kind ("autoencoder" | "calm" | "baseline"), in table order."""
    return list(PRESETS[kind])


def preset(kind: str, name: str, **overrides: Any) -> AutoencoderConfig | CALMConfig | BaselineConfig:
    """The preset ``name`` of a model kind ("autoencoder" | "calm" | "baseline") with ``overrides`` applied."""
    build = {"autoencoder": autoencoder_preset, "calm": calm_preset, "baseline": baseline_preset}[kind]
    return build(name, **overrides)


CONFIG_CLASSES: dict[str, type[_Config]] = {
    "autoencoder": AutoencoderConfig,
    "calm": CALMConfig,
    "baseline": BaselineConfig,
}


def config_from_dict(data: dict[str, Any]) -> AutoencoderConfig | CALMConfig | BaselineConfig:
    kind = data.get("kind")
    if kind not in CONFIG_CLASSES:
        raise ConfigError(f"config has no known 'kind' (got {kind!r}); expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[kind].from_dict(data)  # type: ignore[return-value]


def load_config(path: str | Path) -> AutoencoderConfig | CALMConfig | BaselineConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
    return config_from_dict(data)
