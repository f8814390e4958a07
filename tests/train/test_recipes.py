"""Training recipes: one TrainConfig per (kind, preset), overridable, with clear errors."""

from __future__ import annotations

import pytest

from calmlm.config import AUTOENCODER_PRESETS, CALM_PRESETS
from calmlm.errors import ConfigError
from calmlm.train.recipes import KINDS, RECIPES, recipe
from calmlm.train.trainer import TrainConfig


def test_every_recipe_is_a_valid_train_config_for_a_known_kind_and_size():
    for (kind, size), values in RECIPES.items():
        assert kind in KINDS
        assert size == "default" or size in CALM_PRESETS or size in AUTOENCODER_PRESETS
        assert isinstance(recipe(kind, size), TrainConfig)
        assert all(getattr(recipe(kind, size), k) == v for k, v in values.items())


def test_overrides_win_and_unknown_sizes_fall_back_to_the_default():
    cfg = recipe("calm", "small", lr=5e-4, max_steps=7)
    assert (cfg.lr, cfg.max_steps, cfg.batch_size) == (5e-4, 7, RECIPES[("calm", "small")]["batch_size"])
    assert recipe("baseline", "transformer-s").lr == RECIPES[("baseline", "default")]["lr"]
    assert recipe("calm", "SMALL") == recipe("calm", "small")


def test_small_recipes_anneal_over_their_budget():
    """The small recipes end with a cosine to zero (measured in docs/small_scale.md §2 and §4); the same schedule
    for CALM and the baseline keeps the quickstart's comparison fair."""
    for kind in ("autoencoder", "calm", "baseline"):
        cfg = recipe(kind, "small")
        assert (cfg.schedule, cfg.min_lr_ratio) == ("cosine", 0.0)


def test_errors():
    with pytest.raises(ConfigError, match="unknown model kind 'gpt'"):
        recipe("gpt", "small")
    with pytest.raises(ConfigError, match="lr must be positive"):
        recipe("calm", "small", lr=-1.0)
