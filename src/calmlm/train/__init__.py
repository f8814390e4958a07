"""Training: the engine, data-parallel wrapping, recipes, the training jobs, comparisons and fine-tuning."""
