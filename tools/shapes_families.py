"""The model families tools/pretrain_shapes_model.py pretrains on the shapes world: what each builds, its training loss
and how it is saved. One class per family (SD-1-like with a DDPM epsilon loss; SD3-like with flow matching).

Both share the VAE (32 px -> 4x16x16 latents) and the real CLIP vocabulary; the models are built with torch's seed set
by the caller. The SD3 family's T5 tokenizer is the small one tools/tiny_flow_pipelines.py trains offline.
"""

import copy
import os

import torch

from tools import shapes
from tools.make_tiny_pipeline import save_pipeline_folder

RESOLUTION = 32
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)
LATENT_SIDE = RESOLUTION // 2


class ShapesFamily:
    """A family's models: vae plus the trained ones (named by trained_names, the pipeline's component names)."""

    trained_names = ()
    tokenizer_folders = ("tokenizer",)
    shifts_latents = False  # SD3's VAE subtracts shift_factor before scaling; SD's only scales
    slim_tokenizers = False  # save the CLIP tokenizers without tokenizer.json (the folder stays under ~20 MB)
    optimizer_options = {}

    def __init__(self, args, clip_dir):
        from diffusers import AutoencoderKL

        self.clip_dir = clip_dir
        self.vae = AutoencoderKL(**VAE_CONFIG)

    def trained(self):
        return [getattr(self, name) for name in self.trained_names]

    def parameters(self):
        return [p for module in self.trained() for p in module.parameters()]

    def train(self, mode):
        for module in self.trained():
            module.train(mode)

    def parameter_counts(self):
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in ("vae", *self.trained_names)}

    def set_latent_statistics(self, mean):
        """Register the VAE's scaling (and shift) factor from the training set's latent means; returns (shift, scale)."""
        shift = float(mean.mean()) if self.shifts_latents else 0.0
        scale = float(1.0 / (mean - shift).std())
        self.vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if self.shifts_latents else {}))
        return shift, scale

    def save(self, out_dir, extra_files, weights=None):
        """Save fp16 copies as a pipeline folder; weights (a list like parameters()) replace the trained weights in
        the copies (the EMA). The models in memory stay fp32 and unchanged."""
        modules = {name: copy.deepcopy(module) for name, module in self.modules().items()}
        if weights is not None:
            copies = [p for name in self.trained_names for p in modules[name].parameters()]
            with torch.no_grad():
                for p, w in zip(copies, weights):
                    p.copy_(w)
        pipe = self.pipeline({name: module.eval().half() for name, module in modules.items()})
        save_pipeline_folder(pipe, self.clip_dir, out_dir, extra_files=extra_files,
                             tokenizer_folders=self.tokenizer_folders, tokenizer_json=not self.slim_tokenizers)

    def modules(self):
        return {"vae": self.vae, **{name: getattr(self, name) for name in self.trained_names}}


class SD(ShapesFamily):
    """SD-1-like: a UNet2DConditionModel and one CLIP text encoder; the DDPM epsilon loss; saved with DDIM."""

    name = "sd"
    trained_names = ("unet", "text_encoder")

    def __init__(self, args, clip_dir):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        super().__init__(args, clip_dir)
        width = args.text_width
        self.unet = UNet2DConditionModel(
            sample_size=LATENT_SIDE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
            attention_head_dim=8, norm_num_groups=32)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
            num_hidden_layers=3, max_position_embeddings=77, projection_dim=width, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407))
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77)
        self.scheduler = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")

    def loss(self, captions, latents, generator, rng):
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, SCHEDULE["num_train_timesteps"], (len(captions),), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, self.text_encoder(ids)[0]).sample
        return torch.nn.functional.mse_loss(pred, noise)

    def pipeline(self, modules):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="epsilon")
        return StableDiffusionPipeline(**modules, tokenizer=self.tokenizer, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


class SD3(ShapesFamily):
    """SD3-like: an SD3Transformer2DModel (SD3.5's RMS q/k norm), CLIP-L-like and CLIP-G-like encoders with projection
    and a T5 encoder at tools/tiny_flow_pipelines.py's widths; the flow-matching loss as the trainer computes it for
    SD3 (logit-normal sigmas, the scheduler's shift 3). Prompts are encoded by StableDiffusion3Pipeline.encode_prompt
    itself, so pretraining conditions the transformer exactly as generation does.

    Caption dropout per encoder, as SD3 was trained: besides the 10% empty captions of every family, the CLIP pair and
    T5 each see "" instead of the caption with probability args.encoder_dropout, independently. So either alone
    carries the caption, and T5 is not a passenger the model could ignore."""

    name = "sd3"
    trained_names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    shifts_latents = True
    slim_tokenizers = True  # two CLIP tokenizers: 7.3 MB of tokenizer.json
    optimizer_options = {"fused": True}  # AdamW over ~5M weights (mostly two CLIP vocabularies): 3x faster fused
    max_sequence_length = shapes.FLOW_MAX_SEQUENCE_LENGTH  # CLIP and T5 alike (see there)

    def __init__(self, args, clip_dir):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

        from tools.make_tiny_pipeline import SDXL_PAD_TOKEN_2
        from tools.tiny_flow_pipelines import SD3_WIDTHS, clip_config, t5_encoder, train_t5_tokenizer
        from torch_backend.flow_matching import FlowSettings

        super().__init__(args, clip_dir)
        widths = SD3_WIDTHS
        self.transformer = SD3Transformer2DModel(
            sample_size=LATENT_SIDE, patch_size=2, in_channels=4, out_channels=4, num_layers=args.layers,
            attention_head_dim=16, num_attention_heads=args.transformer_width // 16,
            caption_projection_dim=args.transformer_width, joint_attention_dim=widths["t5xxl"],
            pooled_projection_dim=widths["clip_l"] + widths["clip_g"], pos_embed_max_size=LATENT_SIDE,
            qk_norm="rms_norm")
        t5_dir = os.path.join(clip_dir, "t5")
        t5_vocab = train_t5_tokenizer(t5_dir)
        self.text_encoder = CLIPTextModelWithProjection(clip_config(widths["clip_l"], "quick_gelu", 49407))
        self.text_encoder_2 = CLIPTextModelWithProjection(clip_config(widths["clip_g"], "gelu", 0))
        self.text_encoder_3 = t5_encoder(widths["t5xxl"], t5_vocab)
        length = self.max_sequence_length
        self.tokenizers = dict(tokenizer=CLIPTokenizer.from_pretrained(clip_dir, model_max_length=length),
                               tokenizer_2=CLIPTokenizer.from_pretrained(clip_dir, model_max_length=length,
                                                                         pad_token=SDXL_PAD_TOKEN_2),
                               tokenizer_3=T5TokenizerFast.from_pretrained(t5_dir))
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
        self.flow = FlowSettings("logit_normal")
        self.encoder_dropout = args.encoder_dropout
        self.encoding_pipe = self.pipeline(self.modules())  # the fp32 models in training, for encode_prompt

    def loss(self, captions, latents, generator, rng):
        from torch_backend.flow_matching import draw_u, flow_loss, noisy_input, schedule_points

        clip = [c if rng.uniform() >= self.encoder_dropout else "" for c in captions]
        t5 = [c if rng.uniform() >= self.encoder_dropout else "" for c in captions]
        hidden, _, pooled, _ = self.encoding_pipe.encode_prompt(
            prompt=clip, prompt_2=clip, prompt_3=t5, do_classifier_free_guidance=False, device=torch.device("cpu"),
            max_sequence_length=self.max_sequence_length)
        noise = torch.randn(latents.shape, generator=generator)
        u = torch.cat([draw_u(generator, self.flow) for _ in captions])
        timesteps, sigmas = schedule_points(self.scheduler, u)
        pred = self.transformer(hidden_states=noisy_input(latents, noise, sigmas), timestep=timesteps,
                                encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
        return flow_loss(pred, latents, noise, sigmas, self.flow.weighting_scheme)

    def pipeline(self, modules):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**modules, **self.tokenizers, scheduler=copy.deepcopy(self.scheduler))


FAMILIES = {family.name: family for family in (SD, SD3)}
