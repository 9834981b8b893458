"""SD3/SD3.5: CLIP-L and OpenCLIP bigG (both with projection) and T5-XXL (text_encoder_3); flow matching.

As diffusers' StableDiffusion3Pipeline builds it: the two CLIP encoders' penultimate hidden states side by side,
zero-padded to T5's width, then T5's last hidden state after them in the sequence; the pooled projection is both
CLIP encoders' text_embeds side by side."""

import torch
import torch.nn.functional as F

from textual_inversion_core import families
from textual_inversion_core.errors import UserError

from .base import FlowFamily, clip_width, t5_width


class SD3(FlowFamily):
    spec = families.SD3
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    denoiser_class = "SD3Transformer2DModel"
    default_weighting_scheme = "logit_normal"  # train_dreambooth_lora_sd3.py's defaults
    default_max_sequence_length = 77

    def encode(self, index, text_encoder, ids):
        if self.spec.encoders[index].kind == "t5":
            return (text_encoder(ids)[0],)
        out = text_encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def conditioning(self, outputs, batch):
        (hidden_l, pooled_l), (hidden_g, pooled_g), (t5,) = outputs
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1)}

    def predict(self, models, noisy, batch, conditioning):
        return models.denoiser(hidden_states=noisy, timestep=batch.timesteps, return_dict=False, **conditioning)[0]

    def check_configs(self, transformer, vae, encoders):
        channels = vae["latent_channels"]
        if transformer.get("in_channels") != channels or transformer.get("out_channels", channels) != channels:
            raise UserError(f"the SD3 transformer takes {transformer.get('in_channels')} input channels and the VAE "
                            f"gives {channels}: a control or inpainting transformer is not a text-to-image model this "
                            "loss can train; use the base model")
        pooled = clip_width(encoders[0], True) + clip_width(encoders[1], True)
        if transformer.get("pooled_projection_dim") != pooled or transformer.get("joint_attention_dim") != t5_width(
                encoders[2]):
            raise UserError("the SD3 transformer's pooled_projection_dim / joint_attention_dim do not match its text "
                            f"encoders ({pooled} / {t5_width(encoders[2])}); the pipeline's parts do not belong together")
        if clip_width(encoders[0], False) + clip_width(encoders[1], False) > t5_width(encoders[2]):
            raise UserError("the SD3 CLIP encoders are wider together than T5, so their hidden states cannot be padded "
                            "to T5's width; the pipeline's parts do not belong together")
        super().check_configs(transformer, vae, encoders)
