"""The PyTorch half of textual_inversion.py: models, the train step and the pipeline outputs.

Imported only after the checks that need no model have passed, so a bad flag fails in a second.
"""
