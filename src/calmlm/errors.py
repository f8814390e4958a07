"""User-facing errors and warnings. The CLI prints them as one line (no traceback); an error exits with status 2."""


class CalmError(Exception):
    """Base class of every error calmlm raises for bad input; the message names the problem and the fix."""


class ConfigError(CalmError, ValueError):
    """An invalid or mismatched configuration (bad value, wrong K between model and autoencoder...)."""


class CheckpointError(CalmError):
    """A checkpoint that is missing, corrupt, of another kind, or whose keys/shapes do not match."""


class DataError(CalmError):
    """A corpus that is empty, unreadable or of an unknown format."""


class TokenizerError(CalmError):
    """A tokenizer that cannot be loaded or does not match the model's vocabulary."""


class GenerationError(CalmError, ValueError):
    """Bad generation input: a prompt longer than the context, a bad temperature..."""


class CalmWarning(UserWarning):
    """Something calmlm worked around and the user should know (e.g. unreadable corpus files it skipped)."""
