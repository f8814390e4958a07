"""The models of the paper: the autoencoder (§2), the Transformer backbone, the generative heads (energy, flow, diffusion) and CALM (§3), and the discrete baseline; ``build_model`` makes one from its config."""

from __future__ import annotations

from torch import nn

from .autoencoder import Autoencoder
from .baseline import BaselineLM
from .calm import CALM
from ..config import AutoencoderConfig, BaselineConfig, CALMConfig

AnyModel = Autoencoder | CALM | BaselineLM


def build_model(config: AutoencoderConfig | CALMConfig | BaselineConfig) -> nn.Module:
    if isinstance(config, AutoencoderConfig):
        return Autoencoder(config)
    if isinstance(config, CALMConfig):
        return CALM(config)
    if isinstance(config, BaselineConfig):
        return BaselineLM(config)
    raise TypeError(f"not a model config: {type(config).__name__}")
