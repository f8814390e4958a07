"""Analytic parameter and FLOP counts (calmlm.evaluation.flops) and the `calm flops` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from calmlm.cli import flops as flops_cli
from calmlm.cli import main
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.errors import CalmError, ConfigError
from calmlm.evaluation.flops import count_parameters, inference_flops_per_token, summarize, training_flops_per_token

OFFICIAL_KEYS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official_calm_m_keys.json"

# Paper (arXiv 2510.27688) Table 1 / README figures.
PAPER_PARAMS = {"transformer-s": 281e6, "transformer-m": 465e6, "transformer-l": 849e6,
                "calm-m": 371e6, "calm-l": 735e6, "calm-xl": 1.82e9}
PAPER_INFER = {"transformer-s": 4.4e8, "calm-m": 2.9e8}  # inference FLOPs per token
PAPER_TRAIN_TOTAL = {"transformer-s": 6.6e20, "calm-m": 3.7e20}  # total training FLOPs
PAPER_TRAIN_TOKENS = 5e11  # 250k steps x ~2M tokens: the token count that reproduces the paper's totals


def _preset(name: str):
    return calm_preset(name) if name.startswith("calm") else baseline_preset(name)


def _official_counts() -> dict[str, int]:
    if not OFFICIAL_KEYS.is_file():
        pytest.skip(f"reference fixture {OFFICIAL_KEYS} is absent (shared fixtures not mounted)")
    return json.loads(OFFICIAL_KEYS.read_text())["parameter_counts"]


# ------------------------------------------------------------------------------------------ parameters

def test_calm_m_parameters_match_the_released_model_exactly() -> None:
    ref = _official_counts()
    p = count_parameters(calm_preset("calm-m"))
    assert p["embedding"] + p["backbone"] == ref["backbone_transformer"]
    assert p["input_compression"] == ref["embed_proj"]
    assert p["generative_head"] == ref["generative_head"]
    assert p["total"] == ref["without_autoencoder"]
    assert p["autoencoder"] == ref["autoencoder"]
    assert p["total_with_autoencoder"] == ref["total_unique"]
    assert count_parameters(autoencoder_preset("paper"))["total"] == ref["autoencoder"]


def test_calm_m_parameters_from_state_dict_shapes() -> None:
    """The same totals summed from the reference state-dict shapes (aliases counted once)."""
    if not OFFICIAL_KEYS.is_file():
        pytest.skip(f"reference fixture {OFFICIAL_KEYS} is absent (shared fixtures not mounted)")
    data = json.loads(OFFICIAL_KEYS.read_text())
    aliases = {name for group in data["aliases"] for name in group[1:]}
    sizes: dict[str, int] = {}
    for entry in data["keys"]:
        if entry["key"] in aliases:
            continue
        n = 1
        for dim in entry["shape"]:
            n *= dim
        prefix = entry["key"].split(".")[0]
        sizes[prefix] = sizes.get(prefix, 0) + n
    p = count_parameters(calm_preset("calm-m"))
    assert sizes["ae_model"] == p["autoencoder"]
    assert sizes["transformer"] == p["embedding"] + p["backbone"]
    assert sizes["embed_proj"] == p["input_compression"]
    assert sizes["mlp_generator"] == p["generative_head"]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameters_match_the_paper(name: str) -> None:
    total = count_parameters(_preset(name))["total"]
    assert total == pytest.approx(PAPER_PARAMS[name], rel=0.02)


@pytest.mark.parametrize("config", [calm_preset("debug"), calm_preset("small"), baseline_preset("base"),
                                    baseline_preset("debug", tie_word_embeddings=True), autoencoder_preset("small")])
def test_parameter_components_sum_to_total(config) -> None:
    p = count_parameters(config)
    parts = {k: v for k, v in p.items() if k not in ("total", "autoencoder", "total_with_autoencoder")}
    assert sum(parts.values()) == p["total"]
    if "autoencoder" in p:
        assert p["total_with_autoencoder"] == p["total"] + p["autoencoder"]


def test_tied_baseline_has_no_lm_head_parameters_but_pays_its_flops() -> None:
    tied = baseline_preset("debug", tie_word_embeddings=True)
    assert count_parameters(tied)["lm_head"] == 0
    assert inference_flops_per_token(tied).components["lm_head"] == 2 * tied.hidden_size * tied.vocab_size


# ------------------------------------------------------------------------------------------ FLOPs

@pytest.mark.parametrize("name", sorted(PAPER_INFER))
def test_inference_flops_match_table_1(name: str) -> None:
    assert inference_flops_per_token(_preset(name)).total == pytest.approx(PAPER_INFER[name], rel=0.10)


def test_documented_figures_are_exact() -> None:
    """The figures docs/flops.md quotes, to the FLOP."""
    s, m = baseline_preset("transformer-s"), calm_preset("calm-m")
    assert inference_flops_per_token(s).total == 442_368_000
    assert training_flops_per_token(s).total == 1_327_104_000
    assert inference_flops_per_token(m).total == 290_521_088
    assert training_flops_per_token(m).total == 743_964_672


@pytest.mark.parametrize("name", sorted(PAPER_TRAIN_TOTAL))
def test_training_totals_match_table_1(name: str) -> None:
    per_token = training_flops_per_token(_preset(name)).total
    assert per_token * PAPER_TRAIN_TOKENS == pytest.approx(PAPER_TRAIN_TOTAL[name], rel=0.02)
    # with the token count the released scripts actually process (250k x 2,097,152) it is ~5 % higher
    assert per_token * 250_000 * 2**21 == pytest.approx(PAPER_TRAIN_TOTAL[name], rel=0.06)


def test_calm_m_savings_over_transformer_s_match_the_paper() -> None:
    s, m = baseline_preset("transformer-s"), calm_preset("calm-m")
    infer_saving = 1 - inference_flops_per_token(m).total / inference_flops_per_token(s).total
    train_saving = 1 - training_flops_per_token(m).total / training_flops_per_token(s).total
    assert infer_saving == pytest.approx(0.34, abs=0.01)  # ours: 34.3 %
    assert train_saving == pytest.approx(0.44, abs=0.01)  # ours: 43.9 %


@pytest.mark.parametrize("config", [calm_preset("calm-m"), calm_preset("debug"), baseline_preset("transformer-s")])
def test_breakdowns_sum_to_totals(config) -> None:
    for report in (inference_flops_per_token(config), training_flops_per_token(config)):
        assert sum(report.components.values()) == report.total
        d = report.to_dict()
        assert d["total"] == report.total and d["per_step"] == report.total * report.tokens_per_step


def test_calm_components() -> None:
    cfg = calm_preset("debug")
    train, infer = training_flops_per_token(cfg), inference_flops_per_token(cfg)
    assert set(train.components) == {"backbone", "attention", "input_compression", "generative_head",
                                      "autoencoder_encoder"}
    assert set(infer.components) == {"backbone", "attention", "input_compression", "generative_head",
                                      "autoencoder_decoder"}
    # trained parts cost 3x forward
    for name in ("backbone", "attention", "input_compression"):
        assert train.components[name] == 3 * infer.components[name]
    assert train.notes["num_samples"] == cfg.num_samples


def test_per_token_backbone_cost_scales_as_one_over_k() -> None:
    base = None
    for k in (1, 2, 4, 8):
        cfg = calm_preset("debug", chunk_size=k)
        report = inference_flops_per_token(cfg, context_length=256)  # same text window for every K
        assert report.context_positions == 256 // k
        if base is None:
            base = report
            continue
        assert report.components["backbone"] * k == pytest.approx(base.components["backbone"])
        # fewer positions in the window *and* fewer steps: attention per token falls as 1/K^2
        assert report.components["attention"] * k * k == pytest.approx(base.components["attention"])


def test_head_cost_grows_with_samples_and_draws() -> None:
    cfg = calm_preset("debug")
    one, four = inference_flops_per_token(cfg, head_draws=1), inference_flops_per_token(cfg, head_draws=4)
    per_draw = four.components["generative_head"] - one.components["generative_head"]
    assert per_draw > 0 and one.components["generative_head"] > per_draw / 3  # hidden_embd is paid once
    more = training_flops_per_token(cfg.replace(num_samples=16)).components["generative_head"]
    assert more > training_flops_per_token(cfg).components["generative_head"]


def test_context_defaults_to_the_trained_window() -> None:
    cfg = calm_preset("calm-m")
    r = inference_flops_per_token(cfg)
    assert (r.context_length, r.context_positions) == (cfg.max_position_embeddings * 4, cfg.max_position_embeddings)
    assert inference_flops_per_token(cfg, context_length=1).context_positions == 1  # a partial chunk is a position


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_context_length_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError, match="context_length must be a positive"):
        inference_flops_per_token(calm_preset("debug"), context_length=bad)


def test_bad_head_draws_and_autoencoder_flops_are_errors() -> None:
    with pytest.raises(ConfigError, match="head_draws"):
        inference_flops_per_token(calm_preset("debug"), head_draws=0)
    with pytest.raises(ConfigError, match="autoencoder config only has a parameter count"):
        training_flops_per_token(autoencoder_preset("debug"))
    with pytest.raises(ConfigError, match="cannot count parameters"):
        count_parameters(object())  # type: ignore[arg-type]
    assert "training_flops_per_token" not in summarize(autoencoder_preset("debug"))


# ------------------------------------------------------------------------------------------ CLI

def _cli(argv: list[str]) -> None:
    """The flops subcommand alone, so its tests do not depend on the other commands' modules."""
    parser = argparse.ArgumentParser(prog="calm")
    flops_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_table(capsys) -> None:
    _cli(["flops", "--preset", "calm-m", "--train-tokens", "5e11"])
    out = capsys.readouterr().out
    for text in ("371,731,584", "autoencoder_decoder", "autoencoder_encoder", "generative_head", "2.905e+08",
                 "7.440e+08", "3.720e+20", "2048 chunks of K=4"):
        assert text in out


def test_cli_json_parses(capsys) -> None:
    _cli(["flops", "--preset", "transformer-s", "--json", "--context", "1024"])
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "baseline" and data["parameters"]["total"] == 281_955_072
    assert data["inference_flops_per_token"]["context_length"] == 1024
    assert data["training_flops_per_token"]["total"] == pytest.approx(3 * data["inference_flops_per_token"]["total"])


def test_cli_through_main(capsys) -> None:
    assert main(["flops", "--preset", "debug", "--family", "baseline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "baseline"
    assert main(["flops", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_cli_shared_names_default_to_calm(capsys) -> None:
    _cli(["flops", "--preset", "small", "--json"])
    assert json.loads(capsys.readouterr().out)["kind"] == "calm"


def test_cli_config_file_and_model_dir(tmp_path: Path, capsys) -> None:
    cfg = calm_preset("debug")
    cfg.to_json(tmp_path / "c.json")
    _cli(["flops", "--config", str(tmp_path / "c.json"), "--json"])
    from_file = json.loads(capsys.readouterr().out)
    (tmp_path / "run").mkdir()
    cfg.to_json(tmp_path / "run" / "config.json")
    _cli(["flops", "--model", str(tmp_path / "run"), "--json"])
    from_dir = json.loads(capsys.readouterr().out)
    assert from_file["parameters"] == from_dir["parameters"] == count_parameters(cfg)
    autoencoder_preset("debug").to_json(tmp_path / "ae.json")
    _cli(["flops", "--config", str(tmp_path / "ae.json")])
    assert "no FLOPs-per-token" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "calm-q"], "unknown preset 'calm-q'"),
    (["--preset", "transformer-s", "--family", "calm"], "no calm preset 'transformer-s'"),
    (["--model", "/does/not/exist"], "no model directory"),
    (["--config", "/does/not/exist.json"], "no config file"),
    (["--preset", "debug", "--train-tokens", "0"], "--train-tokens must be positive"),
    (["--preset", "debug", "--context", "-1"], "context_length must be a positive"),
])
def test_cli_errors(argv: list[str], message: str) -> None:
    with pytest.raises(CalmError, match=message):
        _cli(["flops", *argv])


def test_cli_rejects_reference_format_and_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(CalmError, match="no config.json"):
        _cli(["flops", "--model", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["EnergyTransformer"], "patch_size": 4}))
    with pytest.raises(CalmError, match="calm convert"):
        _cli(["flops", "--model", str(tmp_path)])
    with pytest.raises(CalmError, match="use --model"):
        _cli(["flops", "--config", str(tmp_path)])
