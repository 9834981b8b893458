"""Flux.1: CLIP-L (text_encoder, its pooled output only) and T5-XXL (text_encoder_2, the sequence); flow matching.

As diffusers' FluxPipeline and train_dreambooth_lora_flux.py: the latents are packed into 2x2 patches with their
image ids, the text ids are zeros, the transformer takes timestep / 1000 and, when it has a guidance embedding
(FLUX.1-dev), --guidance_scale."""

import torch

from textual_inversion_core import families, flow_matching
from textual_inversion_core.errors import UserError

from .base import FlowFamily, clip_width, t5_width


class Flux(FlowFamily):
    spec = families.FLUX
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    denoiser_class = "FluxTransformer2DModel"
    default_weighting_scheme = "none"  # train_dreambooth_lora_flux.py's defaults
    default_max_sequence_length = 512

    def encode(self, index, text_encoder, ids):
        if self.spec.encoders[index].kind == "t5":
            return (text_encoder(ids)[0],)
        return (text_encoder(ids, output_hidden_states=False).pooler_output,)

    def conditioning(self, outputs, batch):
        (pooled,), (t5,) = outputs
        return {"encoder_hidden_states": t5, "pooled_projections": pooled}

    def predict(self, models, noisy, batch, conditioning):
        from diffusers import FluxPipeline

        transformer, (size, channels, height, width) = models.denoiser, noisy.shape
        packed = FluxPipeline._pack_latents(noisy, size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(conditioning["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            scale = self.args.guidance_scale if self.args.guidance_scale is not None else flow_matching.GUIDANCE_SCALE
            guidance = torch.full((size,), float(scale), device=noisy.device)
        prediction = transformer(hidden_states=packed, timestep=batch.timesteps / 1000, guidance=guidance,
                                 txt_ids=text_ids, img_ids=image_ids, return_dict=False, **conditioning)[0]
        factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(prediction, height * factor, width * factor, factor)

    def check_configs(self, transformer, vae, encoders):
        channels = vae["latent_channels"]
        if transformer.get("in_channels") != 4 * channels or (transformer.get("out_channels") or 4 * channels) != \
                4 * channels:
            raise UserError(f"the Flux transformer takes {transformer.get('in_channels')} input channels, not the "
                            f"{4 * channels} of packed latents: a Fill/Canny/Depth transformer is not a text-to-image "
                            "model this loss can train; use FLUX.1-dev or FLUX.1-schnell")
        if transformer.get("pooled_projection_dim") != clip_width(encoders[0], False) or \
                transformer.get("joint_attention_dim") != t5_width(encoders[1]):
            raise UserError("the Flux transformer's pooled_projection_dim / joint_attention_dim do not match its text "
                            f"encoders ({clip_width(encoders[0], False)} / {t5_width(encoders[1])}); the pipeline's "
                            "parts do not belong together")
        if self.args.guidance_scale is not None and not transformer.get("guidance_embeds"):
            raise UserError("--guidance_scale: this Flux transformer has no guidance embedding (FLUX.1-schnell is not "
                            "guidance-distilled); drop the flag")
        super().check_configs(transformer, vae, encoders)
