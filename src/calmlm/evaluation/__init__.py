"""Evaluation: BrierLM and accuracy-diversity (§4), autoencoder robustness, FLOPs, plots, the
lm-evaluation-harness model."""
