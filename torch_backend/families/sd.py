"""SD-1.x/2.x: one CLIP text encoder whose last hidden state conditions the UNet; DDPM loss (epsilon or v)."""

import numpy as np

from textual_inversion_core import families

from .base import DDPMFamily


class SD(DDPMFamily):
    spec = families.SD
    text_encoder_classes = ("CLIPTextModel",)

    def encode(self, index, text_encoder, ids):
        return (text_encoder(ids)[0],)

    def conditioning(self, outputs, batch):
        """(encoder_hidden_states, added_cond_kwargs) of the UNet."""
        return outputs[0][0], None

    def output_vectors(self, vector_sets):
        """SD-1.x/2.x files take the one [n, dim] array."""
        return np.asarray(vector_sets[0], np.float32)
