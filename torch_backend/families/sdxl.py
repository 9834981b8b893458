"""SDXL: CLIP-L (text_encoder) and OpenCLIP bigG with projection (text_encoder_2); DDPM loss (epsilon or v).

The UNet sees both encoders' penultimate hidden states side by side, and text_encoder_2's pooled projection with
the micro-conditioning time_ids (original size, crop top-left, target size), as SDXL was trained."""

import torch

from textual_inversion_core import families

from .base import DDPMFamily


class SDXL(DDPMFamily):
    spec = families.SDXL
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    uses_time_ids = True

    def encode(self, index, text_encoder, ids):
        out = text_encoder(ids, output_hidden_states=True)
        return (out.hidden_states[-2], out.text_embeds) if index == 1 else (out.hidden_states[-2],)

    def conditioning(self, outputs, batch):
        """(encoder_hidden_states, added_cond_kwargs) of the UNet."""
        hidden = torch.cat([outputs[0][0], outputs[1][0]], dim=-1)
        return hidden, {"text_embeds": outputs[1][1], "time_ids": batch.time_ids}
