"""The JAX/Flax half of textual_inversion_flax.py: weight loading and conversion (weights), the
objective, train state and pure train step (model), and trackers, validation and saving (pipeline).

Imported only after the checks that need no model have passed, so a bad flag fails in a second.
"""
