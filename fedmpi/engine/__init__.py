"""Local training: models, the sequential and batched engines, evaluation, the centralized baseline."""
