"""Full-size flow-matching pipelines with random bf16 weights, for the memory rows of `make bench`.

    python tools/make_tiny_pipeline.py OUT_DIR --size sd35-medium|flux-dev

`sd35-medium` has the architecture of stabilityai/stable-diffusion-3.5-medium: its SD3Transformer2DModel (2.24 B
parameters and a 0.23 B-entry positional table; MMDiT-X: dual attention in the first 13 of 24 blocks, RMS q/k
norm), CLIP-L and OpenCLIP bigG text towers with projection, the T5-XXL encoder (t5-v1_1-xxl, 4.76 B, 32128
embedding rows) and the 16-channel VAE. `flux-dev` has FLUX.1-dev's text side (CLIP-L, T5-XXL) and VAE, and its
FluxTransformer2DModel's config.json only: its 11.9 B parameters are 23.8 GB in bf16, more than this 24 GB machine
can hold beside anything else, so its weights are not written (bench/run.py measures that pipeline's text side only
and states what the step would need). flux-dev hard-links the T5-XXL files of an sd35-medium pipeline beside it when
there is one (the same architecture; a memory row does not care which random weights it holds).

The configs are the published ones (model config.json files as quoted by public code: see bench/notes.md for where
they were read). Every model is built with bf16 as torch's default dtype, so its parameters are created and
initialised in bf16 and no fp32 copy of a big model ever exists; one model is in memory at a time (peak: T5-XXL,
9.5 GB). The folder's frame (model_index.json, scheduler, the CLIP tokenizers with the real vocabulary and the T5
tokenizer trained offline) is the tiny pipeline's of the same family (tools/tiny_flow_pipelines.py); T5's embedding
has the real 32128 rows, more than that tokenizer's few thousand tokens, as the real one has spare rows (32100 tokens).
"""

import contextlib
import gc
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.tiny_flow_pipelines import CLIP_IDS, FLUX_VAE_FACTORS, SD3_VAE_FACTORS  # noqa: E402

BIG_FLOW_SIZES = ("sd35-medium", "flux-dev")

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Both families' VAE (vae/config.json): SDXL's layout with 16 latent channels and no quant convs.
FLOW_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, act_fn="silu", sample_size=1024, force_upcast=True,
                use_quant_conv=False, use_post_quant_conv=False)
# openai/clip-vit-large-patch14's text tower and laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's (as SDXL's).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407, **CLIP_IDS)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              hidden_act="gelu", projection_dim=1280, pad_token_id=0, **CLIP_IDS)
# google/t5-v1_1-xxl (encoder only, as text_encoder_3 / text_encoder_2 of both pipelines).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)


@contextlib.contextmanager
def default_dtype(dtype):
    """Parameters created inside are created (and initialised) in dtype."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def builders(size):
    """[(folder, seed offset, build)] of the models of size; build returns a model, or None for a config-only part."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def t5():
        return T5EncoderModel(T5Config(**T5_XXL))

    if size == "sd35-medium":
        return [("vae", 1, lambda: AutoencoderKL(**FLOW_VAE, **SD3_VAE_FACTORS)),
                ("text_encoder", 2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
                ("text_encoder_2", 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
                ("text_encoder_3", 4, t5),
                ("transformer", 0, lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER))]
    if size == "flux-dev":
        def transformer_config_only():
            return None

        return [("vae", 1, lambda: AutoencoderKL(**FLOW_VAE, **FLUX_VAE_FACTORS)),
                ("text_encoder", 2, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
                ("text_encoder_2", 3, t5),
                ("transformer", 0, transformer_config_only)]
    raise ValueError(size)


def parameter_count(size, folder):
    """Parameters of a part of size, counted on the meta device (nothing is allocated)."""
    return sum(p.numel() for p in meta_model(size, folder).parameters())


def meta_model(size, folder):
    """A part of size on the meta device: its config and shapes, no memory."""
    import torch

    with torch.device("meta"):
        if size == "flux-dev" and folder == "transformer":
            from diffusers import FluxTransformer2DModel

            return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        return dict((name, build) for name, _, build in builders(size))[folder]()


def shared_t5(out_dir, size, folder):
    """The T5-XXL folder of an sd35-medium pipeline beside out_dir, when size is flux-dev and folder its T5 (the same
    architecture: a memory row does not care which random weights it holds); else None."""
    import json

    if size != "flux-dev" or folder != "text_encoder_2":
        return None
    candidate = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "sd35-medium", "text_encoder_3")
    try:
        with open(os.path.join(candidate, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    same = all(config.get(k) == v for k, v in T5_XXL.items() if k in ("vocab_size", "d_model", "d_ff", "num_layers"))
    complete = os.path.isfile(os.path.join(os.path.dirname(candidate), "model_index.json"))
    return candidate if same and complete else None


def make_big_flow_pipeline(out_dir, size, seed=0):
    """Write the sd35-medium or flux-dev pipeline folder to out_dir, one model at a time."""
    import torch

    from textual_inversion_core.hf_layout import add_text_model_prefix, move_into
    from tools.tiny_flow_pipelines import make_flow_pipeline

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{size}-", dir=parent)
    try:
        frame = os.path.join(staging, "pipeline")
        make_flow_pipeline(frame, "tiny-sd3" if size == "sd35-medium" else "tiny-flux", seed)
        for folder, offset, build in builders(size):
            shared = shared_t5(out_dir, size, folder)
            if shared:  # hard links: no second 9.5 GB copy, no minutes of random init
                shutil.rmtree(os.path.join(frame, folder))
                os.makedirs(os.path.join(frame, folder))
                for name in os.listdir(shared):
                    os.link(os.path.join(shared, name), os.path.join(frame, folder, name))
                print(f"{folder}: T5-XXL hard-linked from {shared}", flush=True)
                continue
            torch.manual_seed(seed + offset)
            with default_dtype(torch.bfloat16):
                model = build()
            shutil.rmtree(os.path.join(frame, folder))
            if model is None:  # the FLUX.1-dev transformer: config.json only (see the module docstring)
                meta_model(size, folder).save_config(os.path.join(frame, folder))
                print(f"{folder}: config only ({parameter_count(size, folder) / 1e9:.2f} B parameters, not written)",
                      flush=True)
                continue
            model.to(torch.bfloat16)  # float buffers too (SD3's positional table), as in the released bf16 files
            assert all(p.dtype == torch.bfloat16 for p in model.parameters()), folder
            model.save_pretrained(os.path.join(frame, folder), safe_serialization=True)
            print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters (bf16)", flush=True)
            del model
            gc.collect()
        if size == "flux-dev":  # Flux's text_encoder is a CLIPTextModel (the key-prefix rule of save_pipeline_folder)
            add_text_model_prefix(os.path.join(frame, "text_encoder"))
        move_into(frame, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
