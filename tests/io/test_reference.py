"""Reference-format checkpoints (the CALM reference implementation / released models): the key map, config
translation, numerical agreement with tensors the reference computed, and the loader's error messages.

The fixtures live outside the repository (../shared/fixtures); tests that need them skip when absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from calmlm.cli import main as cli_main
from calmlm.config import calm_preset
from calmlm.errors import CheckpointError, ConfigError
from calmlm.models.losses import energy_diversity, energy_fidelity, energy_score, posterior_targets
from calmlm.models import build_model
from calmlm.io.loading import load_reference
from calmlm.io.reference import (ALIASES, KEY_MAP, autoencoder_fields_from_weights, calm_config, key_rules,
                              map_key, map_keys)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
TINY = FIXTURES / "upstream_tiny_k4"
OFFICIAL_KEYS = FIXTURES / "official_calm_m_keys.json"
TOL = 1e-5

needs_tiny = pytest.mark.skipif(not (TINY / "reference.safetensors").is_file(),
                                reason=f"reference fixtures not found at {TINY} (shared fixtures are not checked in)")
needs_keys = pytest.mark.skipif(not OFFICIAL_KEYS.is_file(), reason=f"{OFFICIAL_KEYS} not found")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(TINY / "reference.safetensors")


def _convert(src: Path, dst: Path, *extra: str) -> Path:
    assert cli_main(["convert", str(src), str(dst), *extra]) == 0
    return dst


@pytest.fixture(scope="module", params=["reference", "converted"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    """The three fixture models, read directly or after `calm convert` (small shards, to exercise sharding)."""
    if not (TINY / "reference.safetensors").is_file():
        pytest.skip(f"reference fixtures not found at {TINY}")
    from calmlm.io.loading import load

    out = {}
    for name in ("autoencoder", "calm", "baseline"):
        src = TINY / name
        if request.param == "converted":
            src = _convert(src, tmp_path_factory.mktemp("conv") / name, "--max-shard-size", "200KB")
            assert json.loads((src / "config.json").read_text())["kind"] == name
        out[name] = load(src)
    return out


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().float() - b.float()).abs().max().item()


# -- numerical agreement with the reference ----------------------------------------------------------------

@needs_tiny
def test_autoencoder_matches_reference(models, ref) -> None:
    ae = models["autoencoder"]
    assert type(ae).__name__ == "Autoencoder" and not ae.training
    with torch.no_grad():
        assert _maxerr(ae.latent_states(ref["input_ids"]), ref["ae_latent_states"]) < TOL
        assert _maxerr(ae.decode(ref["ae_latents"]), ref["ae_decoder_logits"]) < TOL
        mean, log_std = ae.encode(ref["input_ids"])
        assert torch.equal(torch.cat([mean, log_std], -1), ae.latent_states(ref["input_ids"]))


@needs_tiny
def test_calm_matches_reference(models, ref) -> None:
    m = models["calm"]
    assert type(m).__name__ == "CALM"
    with torch.no_grad():
        assert _maxerr(m.hidden_states(ref["input_ids"]), ref["calm_hidden"]) < TOL
        assert _maxerr(m.head(ref["calm_hidden"], ref["gen_noise"]), ref["gen_latents"]) < TOL
        assert torch.equal(m.decode_latents(ref["gen_latents"]), ref["gen_tokens"])
        # the frozen autoencoder inside the CALM checkpoint is the standalone one
        assert _maxerr(m.autoencoder.latent_states(ref["input_ids"]), ref["ae_latent_states"]) < TOL
        out = m(ref["input_ids"], noise=ref["loss_gen_noise"], target_eps=ref["loss_target_eps"])
    assert _maxerr(out.loss.reshape(1), ref["calm_energy_loss"]) < TOL
    assert not any(p.requires_grad for p in m.autoencoder.parameters())


@needs_tiny
def test_baseline_matches_reference(models, ref) -> None:
    b = models["baseline"]
    assert type(b).__name__ == "BaselineLM"
    with torch.no_grad():
        assert _maxerr(b.logits(ref["input_ids"]), ref["baseline_logits"]) < TOL


@needs_tiny
def test_energy_score_terms_match_reference(ref) -> None:
    x = ref["energy_x"]
    y = posterior_targets(ref["energy_mean"], ref["energy_log_std"], ref["energy_eps"].shape[0], ref["energy_eps"])
    assert _maxerr(energy_diversity(x), ref["energy_score_terms"]) < TOL
    assert _maxerr(energy_fidelity(x, y), ref["energy_fidelity"]) < TOL
    assert _maxerr(energy_score(x, y), ref["energy_score"]) < TOL


@needs_tiny
def test_config_translation_follows_the_fixture_configs() -> None:
    cfg = json.loads((TINY / "calm" / "config.json").read_text())
    ae_cfg = json.loads((TINY / "autoencoder" / "config.json").read_text())
    m = load_reference(TINY / "calm")
    c = m.config
    assert (c.chunk_size, c.num_layers, c.num_heads, c.num_kv_heads, c.num_head_blocks) == (
        cfg["patch_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
        cfg["num_mlp_layers"])
    assert (c.noise_size, c.latent_size, c.energy_alpha, c.num_samples, c.max_position_embeddings) == (
        cfg["noise_size"], cfg["latent_size"], cfg["beta"], cfg["num_samples"], cfg["max_position_embeddings"])
    assert c.layer_norm_eps == 1e-6 and c.rms_norm_eps == cfg["rms_norm_eps"]
    # the autoencoder config inferred from the ae_model.* weights equals the standalone autoencoder's
    ae = load_reference(TINY / "autoencoder").config
    assert (ae.hidden_size, ae.intermediate_size, ae.latent_size, ae.chunk_size) == (
        ae_cfg["hidden_size"], ae_cfg["intermediate_size"], ae_cfg["latent_size"], ae_cfg["patch_size"])
    assert ae.token_dropout == ae.latent_dropout == ae_cfg["ae_dropout"] and ae.kl_clamp == ae_cfg["kl_clamp"]
    inferred = c.autoencoder
    for f in ("vocab_size", "chunk_size", "hidden_size", "intermediate_size", "latent_size",
              "num_encoder_layers", "num_decoder_layers", "rms_norm_eps"):
        assert getattr(inferred, f) == getattr(ae, f), f


@needs_tiny
def test_autoencoder_folder_overrides_inference() -> None:
    m = load_reference(TINY / "calm", autoencoder=TINY / "autoencoder")
    assert m.config.autoencoder == load_reference(TINY / "autoencoder").config


# -- memory: no second copy ------------------------------------------------------------------------------

def _file_mappings(name: str) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(name):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@needs_tiny
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
def test_parameters_are_the_mapped_file_not_a_copy(tmp_path: Path) -> None:
    """With dtype kept on CPU every parameter lives inside the memory-mapped pytorch_model.bin, so loading
    a 400M-parameter model costs one copy (page cache), not two. Shards are mapped one after the other."""
    sd = torch.load(TINY / "calm" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    folder = _write_sharded_bin(tmp_path / "sharded", sd, TINY / "calm" / "config.json")
    m = load_reference(folder)
    for shard_name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
        assert _file_mappings(str(folder / shard_name)), f"{shard_name} is not memory-mapped"
    ranges = _file_mappings(str(folder / "pytorch_model-00001-of-00002.bin")) + \
        _file_mappings(str(folder / "pytorch_model-00002-of-00002.bin"))
    outside = [n for n, p in m.named_parameters() if not any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert not outside, f"parameters copied out of the mapped files: {outside[:5]}"


@needs_tiny
def test_dtype_cast_on_load() -> None:
    m = load_reference(TINY / "baseline", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.backbone.rotary.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact


# -- other layouts: sharded .bin, safetensors -------------------------------------------------------------

def _write_sharded_bin(folder: Path, sd: dict[str, torch.Tensor], config: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(config, folder / "config.json")
    keys = list(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@needs_tiny
def test_sharded_bin_and_safetensors_layouts(tmp_path: Path, ref) -> None:
    from safetensors.torch import save_file

    sd = torch.load(TINY / "calm" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    sharded = _write_sharded_bin(tmp_path / "bin", sd, TINY / "calm" / "config.json")
    single = tmp_path / "st"
    single.mkdir()
    shutil.copy(TINY / "calm" / "config.json", single / "config.json")
    save_file({k: v.clone() for k, v in sd.items()}, single / "model.safetensors")  # aliases stored twice
    for folder in (sharded, single):
        with torch.no_grad():
            h = load_reference(folder).hidden_states(ref["input_ids"])
        assert _maxerr(h, ref["calm_hidden"]) < TOL


# -- the full-size model: every released key has a home -----------------------------------------------------

@needs_keys
def test_official_calm_m_keys_map_onto_calm_m() -> None:
    data = json.loads(OFFICIAL_KEYS.read_text())
    keys = {k["key"]: tuple(k["shape"]) for k in data["keys"]}
    assert len(keys) == data["num_keys"]
    config = calm_preset("calm-m")
    with torch.device("meta"):  # nothing is allocated
        model = build_model(config)
    params = dict(model.named_parameters())
    mapped, unknown = map_keys(keys, key_rules("calm"))
    assert not unknown
    for ref_key, target in mapped.items():
        assert target in params, (ref_key, target)
        assert tuple(params[target].shape) == keys[ref_key], (ref_key, target)
    assert set(mapped.values()) == set(params), "some calmlm parameters have no reference key"
    for group in data["aliases"]:  # names of one tensor collapse onto one parameter
        assert len({mapped[k] for k in group}) == 1, group
    assert len(set(mapped.values())) == len(keys) - sum(len(g) - 1 for g in data["aliases"])

    counts = data["parameter_counts"]

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())
    assert n(model) == counts["total_unique"]
    assert n(model.autoencoder) == counts["autoencoder"]
    assert n(model) - n(model.autoencoder) == counts["without_autoencoder"]
    assert n(model.backbone) == counts["backbone_transformer"]
    assert n(model.input_proj) == counts["embed_proj"]
    assert n(model.head) == counts["generative_head"]

    # the released config.json (+ shapes) translates to exactly the calm-m preset
    cfg = {**data["calm_config"], "architectures": ["EnergyTransformer"]}
    translated = calm_config(cfg, keys)
    assert translated.to_dict() == config.to_dict()
    ae_expected = data["autoencoder_config"]
    ae = autoencoder_fields_from_weights(keys, "ae_model.")
    assert (ae["hidden_size"], ae["intermediate_size"], ae["latent_size"], ae["chunk_size"]) == (
        ae_expected["hidden_size"], ae_expected["intermediate_size"], ae_expected["latent_size"],
        ae_expected["patch_size"])


def test_key_map_rules() -> None:
    calm = key_rules("calm")
    assert map_key("transformer.layers.3.self_attn.q_proj.weight", calm) == "backbone.layers.3.self_attn.q_proj.weight"
    assert map_key("generative_head.final_layer.in_ln.bias", calm) == map_key("mlp_generator.final_layer.in_ln.bias", calm)
    assert map_key("ae_model.decoder.lm_head_weight", calm) == "autoencoder.encoder.embed_tokens.weight"
    assert map_key("embed_proj.3.weight", calm) == "input_proj.3.weight"
    assert map_key("something.else", calm) is None
    assert map_key("lm_head.weight", key_rules("baseline", tie_word_embeddings=True)) == "backbone.embed_tokens.weight"
    assert map_key("lm_head.weight", key_rules("baseline")) == "lm_head.weight"
    assert map_keys(["model.layers.0.self_attn.rotary_emb.inv_freq"], key_rules("baseline")) == ({}, [])
    assert set(KEY_MAP) == set(ALIASES) == {"autoencoder", "calm", "baseline"}


# -- errors -------------------------------------------------------------------------------------------------

def _copy_with(tmp_path: Path, name: str, edit_sd=None, edit_cfg=None) -> Path:
    """A copy of a fixture folder with its state dict and/or config edited."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = json.loads((TINY / name / "config.json").read_text())
    if edit_cfg:
        edit_cfg(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = torch.load(TINY / name / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if edit_sd:
        edit_sd(sd)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


@needs_tiny
def test_missing_key_is_named(tmp_path: Path) -> None:
    folder = _copy_with(tmp_path, "autoencoder", edit_sd=lambda sd: sd.pop("decoder.expand_layer.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.expand_layer\.bias"):
        load_reference(folder)


@needs_tiny
def test_unexpected_key_is_named(tmp_path: Path) -> None:
    def add(sd):
        sd["transformer.extra_thing.weight"] = torch.zeros(2)
    folder = _copy_with(tmp_path, "calm", edit_sd=add)
    with pytest.raises(CheckpointError, match=r"unexpected.*transformer\.extra_thing\.weight"):
        load_reference(folder)


@needs_tiny
def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    cfg = json.loads((TINY / "baseline" / "config.json").read_text())
    inter, d = cfg["intermediate_size"], cfg["hidden_size"]

    def bigger(c):
        c["intermediate_size"] = 2 * inter
    folder = _copy_with(tmp_path, "baseline", edit_cfg=bigger)
    with pytest.raises(CheckpointError) as e:
        load_reference(folder)
    msg = str(e.value)
    assert "mlp.gate_proj.weight" in msg and str((inter, d)) in msg and str((2 * inter, d)) in msg


@needs_tiny
def test_chunk_size_mismatch_with_autoencoder(tmp_path: Path) -> None:
    k = json.loads((TINY / "calm" / "config.json").read_text())["patch_size"]

    def other_k(c):
        c["patch_size"] = k // 2
    folder = _copy_with(tmp_path, "calm", edit_cfg=other_k)
    with pytest.raises(ConfigError, match=rf"chunk size K: model {k // 2}, autoencoder {k}"):
        load_reference(folder)


@needs_tiny
def test_aliases_that_differ_are_rejected(tmp_path: Path) -> None:
    def break_alias(sd):
        key = next(k for k in sd if k.startswith("generative_head."))
        sd[key] = sd[key].clone() + 1
    folder = _copy_with(tmp_path, "calm", edit_sd=break_alias)
    with pytest.raises(CheckpointError, match="alias"):
        load_reference(folder)


@needs_tiny
@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "unknown architectures"),
    (lambda c: c.update(architectures=["DiffusionTransformer"]), "but the weights hold the energy head"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_variants_are_rejected(tmp_path: Path, edit, pattern: str) -> None:
    folder = _copy_with(tmp_path, "calm", edit_cfg=edit)
    with pytest.raises(CheckpointError, match=pattern):
        load_reference(folder)


@needs_tiny
def test_vocab_from_weights_wins_over_config(tmp_path: Path) -> None:
    """The released configs may say 128256 while the embedding has 128257 rows ([PAD] added): warn, use rows."""
    rows = json.loads((TINY / "baseline" / "config.json").read_text())["vocab_size"]

    def smaller(c):
        c["vocab_size"] = rows - 1
    folder = _copy_with(tmp_path, "baseline", edit_cfg=smaller)
    with pytest.warns(UserWarning, match=f"using {rows}"):
        m = load_reference(folder)
    assert m.config.vocab_size == rows


@needs_tiny
def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    shutil.copy(TINY / "calm" / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        load_reference(tmp_path / "m")
