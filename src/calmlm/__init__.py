"""calmlm: Continuous Autoregressive Language Models (Shao et al. 2025, arXiv 2510.27688)."""

from .config import AutoencoderConfig, BaselineConfig, CALMConfig
from .errors import CalmError, CheckpointError, ConfigError, DataError, GenerationError, TokenizerError
from .loading import load

__version__ = "0.1.0"

__all__ = [
    "load",
    "AutoencoderConfig", "BaselineConfig", "CALMConfig",
    "CalmError", "CheckpointError", "ConfigError", "DataError", "GenerationError", "TokenizerError",
]
