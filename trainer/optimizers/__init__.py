"""Optimizers of the trainer: Shampoo, usable on its own in any Keras 3 model."""

from trainer.optimizers.shampoo import GRAFT_TYPES, PRECONDITION_MODES, Shampoo

__all__ = ["GRAFT_TYPES", "PRECONDITION_MODES", "Shampoo"]
