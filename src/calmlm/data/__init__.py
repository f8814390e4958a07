"""Data: corpora, token datasets and block sampling, tokenizers."""
