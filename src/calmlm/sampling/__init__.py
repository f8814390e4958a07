"""Sampling: likelihood-free temperature sampling (§5) and generation with a KV cache."""
