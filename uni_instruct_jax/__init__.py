"""Uni-Instruct in JAX/Flax: one-step distillation of EDM teachers by expanded f-divergences."""

__version__ = "0.1.0"
