"""Load checkpoints written by the CALM reference implementation (github.com/shaochenze/calm).

The released models (Hugging Face ``cccczshao/CALM-M``, ``-L``, ``-XL``, ``CALM-Autoencoder``) are
transformers ``save_pretrained`` folders: ``config.json`` plus ``pytorch_model.bin`` (a plain torch state
dict; large ones sharded as ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``, or the
safetensors equivalents). Three architectures are understood, named by ``config.json["architectures"]``:

* ``Autoencoder``        -> :class:`calmlm.models.autoencoder.Autoencoder`
* ``EnergyTransformer``  -> :class:`calmlm.models.calm.CALM` (energy head; the frozen autoencoder is in the weights)
* ``FlowTransformer``, ``DiffusionTransformer`` -> :class:`calmlm.models.calm.CALM` with the flow / diffusion head
  (the reference does not save ``model_type``; the head is told from ``architectures`` and the weights)
* ``LlamaForCausalLM``   -> :class:`calmlm.models.baseline.BaselineLM`

Nothing here imports reference code or builds a model: this module is a translation (like torchtitan's
state-dict adapters) by explicit tables, ``KEY_MAP`` (state dict keys) and the field tables (``config.json``).
:func:`translate` turns a folder into a calmlm config plus renamed weight keys; :func:`calmlm.io.loading.build`
then builds, fills, ties and checks as for a native checkpoint.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .checkpoint import WEIGHT_FILES, WeightFiles, model_config, read_json
from ..config import AutoencoderConfig, BaselineConfig, CALMConfig
from ..errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------------------
# State-dict keys. Rules are tried in order; a rule whose reference side ends with "." renames a prefix,
# any other rule renames one exact key. Several reference keys may land on the same calmlm key: those are
# aliases of one tensor (the reference stores them once); the loader checks they are equal and keeps one.

KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    "autoencoder": (
        ("decoder.lm_head_weight", "encoder.embed_tokens.weight"),  # output projection tied to the embedding
        ("encoder.", "encoder."),
        ("decoder.", "decoder."),
    ),
    "calm": (
        ("transformer.", "backbone."),  # a transformers LlamaModel; same submodule names as ours
        ("embed_proj.", "input_proj."),  # Linear K*d->2d, SiLU, Linear 2d->d, LayerNorm
        ("mlp_generator.", "head."),  # the energy generative head
        ("generative_head.", "head."),  # energy: an alias of mlp_generator; flow/diffusion: the head itself
        ("ae_model.decoder.lm_head_weight", "autoencoder.encoder.embed_tokens.weight"),  # tied alias
        ("ae_model.", "autoencoder."),  # the frozen autoencoder, whole
    ),
    "baseline": (
        ("model.", "backbone."),
        ("lm_head.", "lm_head."),
    ),
}
# With tie_word_embeddings the Llama output matrix is the embedding (transformers may or may not store it).
TIED_BASELINE_RULE = ("lm_head.weight", "backbone.embed_tokens.weight")
# Reference keys whose tensor is stored again under another key (documentation and tests).
ALIASES: dict[str, tuple[str, ...]] = {
    "autoencoder": ("decoder.lm_head_weight",),
    "calm": ("generative_head.", "ae_model.decoder.lm_head_weight"),
    "baseline": (),
}
# Buffers that old transformers versions saved and that calmlm recomputes.
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# The generative head of each CALM architecture (CALMConfig.head).
CALM_HEADS = {"EnergyTransformer": "energy", "FlowTransformer": "flow", "DiffusionTransformer": "diffusion"}
ARCHITECTURES = {"Autoencoder": "autoencoder", **dict.fromkeys(CALM_HEADS, "calm"), "LlamaForCausalLM": "baseline"}

# ---------------------------------------------------------------------------------------------------
# config.json fields: reference name -> calmlm field(s). Missing fields fall back to calmlm's defaults
# (which are the reference's) or, for shapes, to what the weights say.

BACKBONE_FIELDS: dict[str, tuple[str, ...]] = {
    # max_position_embeddings is kept as is: for CALM the reference's LlamaModel counts chunk positions, which is
    # what our backbone's field means too; RoPE without scaling makes it only a default KV-cache length.
    **{name: (name,) for name in ("vocab_size", "hidden_size", "intermediate_size", "rope_theta", "rms_norm_eps",
                                  "max_position_embeddings", "initializer_range", "bos_token_id", "eos_token_id")},
    "num_hidden_layers": ("num_layers",),
    "num_attention_heads": ("num_heads",),
    "num_key_value_heads": ("num_kv_heads",),
}
CALM_FIELDS: dict[str, tuple[str, ...]] = {
    **BACKBONE_FIELDS,
    **{name: (name,) for name in ("latent_size", "noise_size", "num_samples")},
    "patch_size": ("chunk_size",),
    "num_mlp_layers": ("num_head_blocks",),
    "beta": ("energy_alpha",),  # exponent of the distances in the energy score
    "layer_norm_eps": ("layer_norm_eps",),  # absent in reference configs: it hard-codes 1e-6 (our default)
}
BASELINE_FIELDS: dict[str, tuple[str, ...]] = {**BACKBONE_FIELDS, "tie_word_embeddings": ("tie_word_embeddings",)}
AUTOENCODER_FIELDS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "num_encoder_layers",
                                  "num_decoder_layers", "rms_norm_eps", "kl_weight", "kl_clamp", "initializer_range")},
    "patch_size": ("chunk_size",),
    "ae_dropout": ("token_dropout", "latent_dropout"),  # one rate for both in the reference
}


# -- keys --------------------------------------------------------------------------------------------

def key_rules(kind: str, tie_word_embeddings: bool = False) -> tuple[tuple[str, str], ...]:
    rules = KEY_MAP[kind]
    return ((TIED_BASELINE_RULE,) + rules) if kind == "baseline" and tie_word_embeddings else rules


def map_key(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    """The calmlm name of a reference key, or None when no rule covers it."""
    for ref, ours in rules:
        if ref.endswith("."):
            if key.startswith(ref):
                return ours + key[len(ref):]
        elif key == ref:
            return ours
    return None


def map_keys(keys: Iterable[str], rules: Iterable[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """Reference keys -> ({reference key: calmlm key}, [keys no rule covers]); ignorable buffers are dropped."""
    rules = tuple(rules)
    mapped, unknown = {}, []
    for key in keys:
        if IGNORED_KEY.search(key):
            continue
        target = map_key(key, rules)
        if target is None:
            unknown.append(key)
        else:
            mapped[key] = target
    return mapped, unknown


# -- config translation ------------------------------------------------------------------------------

def reference_kind(cfg: dict[str, Any], where: str = "config.json") -> str:
    """'autoencoder' | 'calm' | 'baseline' from the ``architectures`` field; unsupported variants rejected."""
    archs = cfg.get("architectures") or (["LlamaForCausalLM"] if cfg.get("model_type") == "llama" else [])
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise CheckpointError(f"{where} names unknown architectures {archs}; calmlm reads reference checkpoints "
                          f"of {sorted(ARCHITECTURES)} and its own format (config.json with 'kind')")


def _reject_unsupported(cfg: dict[str, Any], where: str) -> None:
    problems = []
    if cfg.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={cfg['rope_scaling']!r} (only plain RoPE is implemented)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            problems.append(f"{flag}=true (calmlm's Llama layers have no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu' is implemented)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and cfg.get("num_attention_heads") and \
            head_dim * cfg["num_attention_heads"] != cfg.get("hidden_size"):
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads")
    if problems:
        raise CheckpointError(f"{where} uses features calmlm does not support: " + "; ".join(problems))


def _translate(cfg: dict[str, Any], table: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ref, ours in table.items():
        value = cfg.get(ref)
        if ref == "eos_token_id" and isinstance(value, list):  # Llama 3.1 style: several stop ids
            value = value[0] if value else None
        if value is not None:
            out.update(dict.fromkeys(ours, value))
    if "num_heads" in out:  # transformers' Llama default: one KV head per query head
        out.setdefault("num_kv_heads", out["num_heads"])
    return out


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    """Number of distinct layer indices i among keys matching ``pattern`` (a regex with one (\\d+) group)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def autoencoder_fields_from_weights(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, Any]:
    """Autoencoder hyper-parameters read off the weight shapes (the released CALM configs lack them)."""
    p = re.escape(prefix)
    try:
        vocab, d = shapes[f"{prefix}encoder.embed_tokens.weight"]
        inter = shapes[f"{prefix}encoder.encoder_layers.0.mlp.gate_proj.weight"][0]
        k = shapes[f"{prefix}encoder.squeeze_layer.weight"][1] // d
        latent = shapes[f"{prefix}decoder.latent_to_hidden.weight"][1]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot infer the autoencoder's shape: weight {e} is missing or malformed "
                              f"(expected the reference keys under {prefix or 'the top level'!r}); pass the "
                              "autoencoder folder explicitly (--autoencoder PATH)") from None
    return dict(vocab_size=vocab, hidden_size=d, intermediate_size=inter, chunk_size=k, latent_size=latent,
                num_encoder_layers=_count(shapes, rf"{p}encoder\.encoder_layers\.(\d+)\."),
                num_decoder_layers=_count(shapes, rf"{p}decoder\.decoder_layers\.(\d+)\."))


def head_from_weights(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """'energy' | 'flow' | 'diffusion' from the state-dict keys, or None when they name no head.

    The energy head lives under ``mlp_generator.`` (aliased as ``generative_head.``); the flow and diffusion
    heads only under ``generative_head.net.``, whose output layer has l (flow, a velocity) or 2l (diffusion,
    ε and the variance value) rows."""
    if any(k.startswith("mlp_generator.") for k in shapes):
        return "energy"
    out = shapes.get("generative_head.net.final_layer.linear.weight")
    latent = shapes.get("generative_head.net.input_proj.weight")
    if out is None or latent is None:
        return None
    return {latent[1]: "flow", 2 * latent[1]: "diffusion"}.get(out[0])


def reference_head(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str = "config.json") -> str:
    """The generative head of a reference CALM folder: ``architectures`` and the weights must agree."""
    named = [CALM_HEADS[a] for a in cfg.get("architectures") or [] if a in CALM_HEADS]
    found = head_from_weights(shapes)
    if named and found and named[0] != found:
        raise CheckpointError(f"{where} names {cfg['architectures'][0]} (a {named[0]} head) but the weights hold the "
                              f"{found} head; config.json does not belong to these weights")
    head = named[0] if named else found
    if head is None:
        raise CheckpointError(f"{where}: cannot tell the generative head (no EnergyTransformer/FlowTransformer/"
                              "DiffusionTransformer in architectures, and no mlp_generator.* or "
                              "generative_head.net.* weights)")
    return head


def _calm_fields_from_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "transformer.embed_tokens.weight" in shapes:
        out["vocab_size"], d = shapes["transformer.embed_tokens.weight"]
        if "embed_proj.0.weight" in shapes:
            out["chunk_size"] = shapes["embed_proj.0.weight"][1] // d
    if "mlp_generator.noise_embd.weight" in shapes:
        out["noise_size"] = shapes["mlp_generator.noise_embd.weight"][1]
    if "mlp_generator.final_layer.linears.2.weight" in shapes:
        out["latent_size"] = shapes["mlp_generator.final_layer.linears.2.weight"][0]
    if "generative_head.net.input_proj.weight" in shapes:  # flow / diffusion head
        out["latent_size"] = shapes["generative_head.net.input_proj.weight"][1]
    counts = {"num_head_blocks": (_count(shapes, r"mlp_generator\.mlp_blocks\.(\d+)\.")
                                  or _count(shapes, r"generative_head\.net\.res_blocks\.(\d+)\.")),
              "num_layers": _count(shapes, r"transformer\.layers\.(\d+)\.")}
    return {**out, **{field: n for field, n in counts.items() if n}}


def _vocab_from_weights(values: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None, embedding: str,
                        where: str) -> None:
    """The embedding's row count wins over config.json's vocab_size (the reference sets vocab_size =
    len(tokenizer) after adding [PAD], so 128256 and 128257 both occur); say so when they differ."""
    if not shapes or embedding not in shapes:
        return
    rows = shapes[embedding][0]
    if values.get("vocab_size") not in (None, rows):
        warnings.warn(f"{where}: config.json says vocab_size {values['vocab_size']} but the embedding has {rows} "
                      f"rows; using {rows}", stacklevel=3)
    values["vocab_size"] = rows


def autoencoder_config(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None,
                       where: str = "config.json") -> AutoencoderConfig:
    """A reference ``Autoencoder`` config.json (+ the weight shapes, for fields it lacks) -> AutoencoderConfig."""
    _reject_unsupported(cfg, where)
    inferred: dict[str, Any] = {}
    with contextlib.suppress(CheckpointError):  # config.json has the fields; the key check names a missing weight
        inferred = autoencoder_fields_from_weights(shapes or {})
    values = {**inferred, **_translate(cfg, AUTOENCODER_FIELDS)}
    _vocab_from_weights(values, shapes, "encoder.embed_tokens.weight", where)
    return _build(AutoencoderConfig, values, where)


def calm_config(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                autoencoder: AutoencoderConfig | None = None, where: str = "config.json") -> CALMConfig:
    """A reference ``EnergyTransformer`` / ``FlowTransformer`` / ``DiffusionTransformer`` config.json -> CALMConfig.

    Its ``ae_path`` names the training cluster's folder, so the autoencoder's config comes from ``autoencoder``
    when given, else from the shapes of the ``ae_model.*`` weights plus the reference defaults."""
    _reject_unsupported(cfg, where)
    values = {**_calm_fields_from_weights(shapes), **_translate(cfg, CALM_FIELDS)}
    values["head"] = reference_head(cfg, shapes, where)  # the reference hard-codes the head's other options
    if values["head"] != "energy" and "num_samples" in values:  # its flow/diffusion heads repeat each target
        values["num_targets"] = values.pop("num_samples")  # num_samples times: our num_targets
    _vocab_from_weights(values, shapes, "transformer.embed_tokens.weight", where)
    if autoencoder is None:
        autoencoder = _build(AutoencoderConfig, autoencoder_fields_from_weights(shapes, prefix="ae_model."),
                             f"{where} (autoencoder inferred from ae_model.* weights)")
    return _build(CALMConfig, {**values, "autoencoder": autoencoder}, where)


def baseline_config(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None,
                    where: str = "config.json") -> BaselineConfig:
    """A transformers ``LlamaForCausalLM`` config.json -> BaselineConfig."""
    _reject_unsupported(cfg, where)
    values = _translate(cfg, BASELINE_FIELDS)
    _vocab_from_weights(values, shapes, "model.embed_tokens.weight", where)
    return _build(BaselineConfig, values, where)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in values.items() if k in known})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:  # a field of the wrong JSON type, e.g. a string where a number belongs
        raise ConfigError(f"{where}: invalid value ({e}); fix config.json") from None


# -- the whole folder --------------------------------------------------------------------------------

@dataclass
class Translation:
    """A reference folder in calmlm's terms: the config, the weight files and how their keys are renamed."""

    config: AutoencoderConfig | CALMConfig | BaselineConfig
    files: WeightFiles
    rename: dict[str, str]  # every stored key but recomputed buffers -> its calmlm name (unknown keys: as is)
    autoencoder_dir: Path | None = None  # a CALM folder without ae_model.* weights: the autoencoder is here


def translate(directory: str | Path, autoencoder: str | Path | AutoencoderConfig | None = None) -> Translation:
    """Read a reference-format folder's config.json and weight index (no tensor is loaded).

    ``autoencoder`` (CALM only): a folder (either format) or config that supplies the autoencoder's
    hyper-parameters instead of inferring them from the ``ae_model.*`` weights, and its weights when the CALM
    checkpoint holds none."""
    directory = Path(directory)
    where = str(directory / "config.json")
    cfg = read_json(directory / "config.json")
    kind = reference_kind(cfg, where)
    files = WeightFiles.find(directory)
    if files is None:
        raise CheckpointError(f"{directory} has a config.json but no weights (looked for {', '.join(WEIGHT_FILES)}); "
                              "the download is incomplete")
    shapes = files.shapes()
    ae_dir = None
    if kind == "autoencoder":
        config: Any = autoencoder_config(cfg, shapes, where)
    elif kind == "baseline":
        config = baseline_config(cfg, shapes, where)
    else:
        ae_config = None
        if autoencoder is not None:
            ae_config, ae_dir = _autoencoder_config_from(autoencoder)
            if any(k.startswith("ae_model.") for k in shapes):
                ae_dir = None  # the CALM folder has its own copy of the autoencoder's weights
            elif ae_dir is None:
                raise CheckpointError(f"{directory} holds no autoencoder weights (ae_model.*); pass the "
                                      "autoencoder folder, not only its config")
        config = calm_config(cfg, shapes, ae_config, where)
    mapped, unknown = map_keys(shapes, key_rules(kind, getattr(config, "tie_word_embeddings", False)))
    return Translation(config, files, {**{k: k for k in unknown}, **mapped}, ae_dir)


def _autoencoder_config_from(source: str | Path | AutoencoderConfig) -> tuple[AutoencoderConfig, Path | None]:
    if isinstance(source, AutoencoderConfig):
        return source, None
    directory = Path(source).expanduser()
    where = str(directory / "config.json")
    cfg = read_json(directory / "config.json")
    if "kind" in cfg:
        return model_config(directory, expect="autoencoder"), directory
    if reference_kind(cfg, where) != "autoencoder":
        raise CheckpointError(f"{directory} is not an autoencoder checkpoint "
                              f"(architectures {cfg.get('architectures')})")
    files = WeightFiles.find(directory)
    return autoencoder_config(cfg, files.shapes() if files else None, where), directory
