"""Framework-free core shared by textual_inversion.py (PyTorch) and textual_inversion_flax.py (JAX).

Nothing in this package imports torch or jax at module level: the CLI definition, the dataset and
prompt templates, embedding file formats, checkpoint naming and the hub upload live here once.
"""

from .errors import UserError

__all__ = ["UserError"]
