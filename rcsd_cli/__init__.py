"""rcsd: Rubric-Conditioned Self-Distillation for reasoning language models."""

__version__ = "0.1.0"
