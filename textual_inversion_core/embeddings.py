"""Embedding files: writers and readers for diffusers, AUTOMATIC1111, kohya/ComfyUI and OneTrainer formats.

One import for the trainers, the converter and the tests; the code lives in embedding_base (names, hashes, vector
sets), embedding_writers and embedding_readers.
"""

# Re-exported: every public name of the three modules is reachable as embeddings.<name>.
from .embedding_base import *  # noqa: F401,F403
from .embedding_readers import *  # noqa: F401,F403
from .embedding_writers import *  # noqa: F401,F403
