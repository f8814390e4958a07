"""calmlm: Continuous Autoregressive Language Models (Shao et al. 2025, arXiv 2510.27688)."""

from .config import AutoencoderConfig, BaselineConfig, CALMConfig
from .errors import CalmError, CheckpointError, ConfigError, DataError, GenerationError, TokenizerError
from .io.loading import load
from .models import Autoencoder, BaselineLM, CALM, build_model

__version__ = "0.1.0"

__all__ = [
    "load", "build_model", "Autoencoder", "BaselineLM", "CALM",
    "AutoencoderConfig", "BaselineConfig", "CALMConfig",
    "CalmError", "CheckpointError", "ConfigError", "DataError", "GenerationError", "TokenizerError",
]
