#!/usr/bin/env python
"""Write a complete StableDiffusionPipeline (or StableDiffusionXLPipeline) folder with random weights, offline.

    python tools/make_tiny_pipeline.py OUT_DIR [--size tiny|sd15|tiny-sdxl|sdxl|tiny-sd3|tiny-flux|tiny-flux-schnell
                                               |sd35-medium|flux-dev]
                                               [--seed 0]

`tiny` is about the size of diffusers' own test pipeline (trains at 64 px in well under a second a
step on a CPU); `sd15` has the public Stable Diffusion 1.5 architecture (for benchmarks); `tiny-sdxl`
is a tiny SDXL pipeline whose two text encoders have different widths (32 and 48), so code that mixes
up CLIP-L and OpenCLIP-bigG fails on it; `sdxl` has SDXL base 1.0's architecture (3.5 B parameters,
13.9 GB of fp32 files; generating it needs ~11 GB of RAM, one model at a time). `tiny-sd3` and
`tiny-flux` are the flow-matching families at test size (see tools/tiny_flow_pipelines.py): SD3's three
encoders and Flux.1's two, a T5 tokenizer trained here, a 16-channel VAE; `tiny-flux-schnell` is tiny-flux
without the guidance embedding (as FLUX.1-schnell). All use the real CLIP BPE
vocabulary (49408 tokens) read from the `clip-anytorch` or `open_clip_torch` wheel, so
token ids match the real models. CLIPTextModel is
saved with the `text_model.` key prefix, which both transformers 4.x and 5.x load (5.x itself would
drop the prefix, which 4.x misreads); CLIPTextModelWithProjection keeps it in both versions.
"""

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from textual_inversion_core.hf_layout import add_text_model_prefix, move_into  # noqa: E402

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
FLOW_SIZES = ("tiny-sd3", "tiny-flux", "tiny-flux-schnell")
BIG_FLOW_SIZES = ("sd35-medium", "flux-dev")  # tools/big_flow_pipelines.py (bf16, for bench rows)


def find_clip_vocab():
    """Path of CLIP's BPE file inside an installed wheel (the packages are not imported)."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                path = os.path.join(folder, VOCAB_FILE)
                if os.path.isfile(path):
                    return path
    sys.exit(f"error: {VOCAB_FILE} not found; install it with `pip install --no-deps clip-anytorch`")


def byte_to_unicode_table():
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer_files(folder, vocab_gz):
    """vocab.json + merges.txt exactly as OpenAI's CLIP tokenizer defines them (49408 entries)."""
    lines = gzip.open(vocab_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(byte_to_unicode_table().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def configs(size):
    if size == "tiny":
        unet = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        vae = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                   latent_channels=4, sample_size=64)
        text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32)
    elif size == "sd15":
        unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    cross_attention_dim=768, attention_head_dim=8)
        vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, latent_channels=4, sample_size=512)
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    hidden_act="quick_gelu", projection_dim=768)
    else:
        raise ValueError(size)
    text.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return unet, vae, text


# tiny-sdxl: SDXL's layout at test size. The two encoders' widths differ (and differ from every other
# size here) so that a clip_l/clip_g mix-up is a shape error, not a silent swap.
SDXL_TEXT_WIDTH = 32  # text_encoder (CLIP-L's place, 768 in SDXL)
SDXL_TEXT_2_WIDTH = 48  # text_encoder_2 (OpenCLIP bigG's place, 1280 in SDXL); also its projection_dim
SDXL_TIME_EMBED_DIM = 8
SDXL_PAD_TOKEN_2 = "!"  # stabilityai/stable-diffusion-xl-base-1.0's tokenizer_2 pads with "!" (id 0)


def sdxl_configs():
    """(unet, vae, text_encoder, text_encoder_2) configs of the tiny SDXL pipeline."""
    # SDXL's UNet adds the pooled text_encoder_2 output and 6 size/crop numbers (each embedded to
    # addition_time_embed_dim) to the time embedding; cross-attention sees both encoders side by side.
    unet = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                cross_attention_dim=SDXL_TEXT_WIDTH + SDXL_TEXT_2_WIDTH,
                addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_2_WIDTH)
    vae = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
               latent_channels=4, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text = dict(hidden_size=SDXL_TEXT_WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                hidden_act="quick_gelu", projection_dim=SDXL_TEXT_WIDTH, pad_token_id=49407, **ids)
    text_2 = dict(hidden_size=SDXL_TEXT_2_WIDTH, intermediate_size=53, num_attention_heads=4, num_hidden_layers=5,
                  hidden_act="gelu", projection_dim=SDXL_TEXT_2_WIDTH, pad_token_id=0, **ids)
    return unet, vae, text, text_2


def sdxl_base_configs():
    """(unet, vae, text_encoder, text_encoder_2) configs with the architecture of SDXL base 1.0
    (stabilityai/stable-diffusion-xl-base-1.0), written from its published model configs.

    UNet 2.57 B parameters, text_encoder (CLIP ViT-L/14's text tower) 123 M, text_encoder_2 (OpenCLIP
    ViT-bigG/14's) 695 M, VAE 84 M. Token ids follow the tiny pipelines (bos 49406, eos 49407,
    tokenizer_2 pads with "!", id 0), which is what their tokenizers produce; the hub configs carry
    placeholder ids (0/1/2) that transformers ignores when it locates the eos token.
    """
    unet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),  # (head counts, as in the hub config)
                use_linear_projection=True, cross_attention_dim=2048, norm_num_groups=32, norm_eps=1e-5,
                act_fn="silu", flip_sin_to_cos=True, freq_shift=0, mid_block_type="UNetMidBlock2DCrossAttn",
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)  # 6 x 256 time ids + 1280 pooled text_encoder_2
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=1024,
               scaling_factor=0.13025, force_upcast=True)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               layer_norm_eps=1e-5)
    text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407, **ids)
    text_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  hidden_act="gelu", projection_dim=1280, pad_token_id=0, **ids)
    return unet, vae, text, text_2


def make_sdxl_base_pipeline(out_dir, seed=0):
    """The `sdxl` size: SDXL base 1.0's architecture with random weights.

    The folder's frame (model_index.json, scheduler, both tokenizers) is the tiny SDXL pipeline's,
    written by diffusers; each of its four models is then replaced by the full-size one, built and
    saved one at a time (peak RAM ≈ the fp32 UNet, 10.3 GB, instead of all four models' 13.9 GB).
    """
    import gc

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg, text_cfg, text_2_cfg = sdxl_base_configs()
    builders = (  # the seeds follow make_sdxl_pipeline's order
        ("vae", 1, lambda: AutoencoderKL(**vae_cfg)),
        ("text_encoder", 2, lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))),
        ("text_encoder_2", 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg))),
        ("unet", 0, lambda: UNet2DConditionModel(**unet_cfg)),
    )
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-sdxl-", dir=parent)
    try:
        frame = os.path.join(staging, "pipeline")
        make_sdxl_pipeline(frame, seed)
        for name, offset, build in builders:
            torch.manual_seed(seed + offset)
            model = build()
            shutil.rmtree(os.path.join(frame, name))
            model.save_pretrained(os.path.join(frame, name), safe_serialization=True)
            print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
            del model
            gc.collect()
        add_text_model_prefix(os.path.join(frame, "text_encoder"))
        move_into(frame, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def make_pipeline(out_dir, size="tiny", seed=0):
    if size in BIG_FLOW_SIZES:
        from tools import big_flow_pipelines

        return big_flow_pipelines.make_big_flow_pipeline(out_dir, size, seed)
    if size in FLOW_SIZES:
        from tools import tiny_flow_pipelines

        return tiny_flow_pipelines.make_flow_pipeline(out_dir, size, seed)
    if size == "tiny-sdxl":
        return make_sdxl_pipeline(out_dir, seed)
    if size == "sdxl":
        return make_sdxl_base_pipeline(out_dir, seed)
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg = configs(size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_cfg)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False, prediction_type="epsilon")

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp, find_clip_vocab())
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        save_pipeline_folder(pipe, tmp, out_dir)
    return out_dir


def make_sdxl_pipeline(out_dir, seed=0):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg, text_2_cfg = sdxl_configs()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_cfg)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg))
    # The scheduler settings of stabilityai/stable-diffusion-xl-base-1.0.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False, prediction_type="epsilon")

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp, find_clip_vocab())
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=SDXL_PAD_TOKEN_2)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
        save_pipeline_folder(pipe, tmp, out_dir, tokenizer_folders=("tokenizer", "tokenizer_2"))
    return out_dir


def save_pipeline_folder(pipe, tokenizer_dir, out_dir, extra_files=None, tokenizer_folders=("tokenizer",),
                         tokenizer_json=True):
    """Save pipe as a folder both transformers 4.x and 5.x load, replacing out_dir's pipeline.

    Written to a staging folder beside out_dir first; model_index.json is moved in last, so a crash
    never leaves something that looks like a complete pipeline. tokenizer_dir holds vocab.json and
    merges.txt (transformers 5 writes only tokenizer.json, which 4.x cannot read), copied into each of
    tokenizer_folders; extra_files maps file names to text written at the top of the folder.
    tokenizer_json=False leaves out tokenizer_folders' tokenizer.json: vocab.json + merges.txt load to the same
    CLIP tokenizer (checked in transformers 5: same ids, padding and added tokens), and tokenizer.json repeats the
    49408-token vocabulary in 3.6 MB per folder.
    """
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=parent)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        for folder in tokenizer_folders:
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(staging, folder, name))
            if not tokenizer_json:
                os.remove(os.path.join(staging, folder, "tokenizer.json"))
        # Only CLIPTextModel loses the prefix; text_encoder_2 (WithProjection) keeps it and must not be touched.
        add_text_model_prefix(os.path.join(staging, "text_encoder"))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(staging, name), "w") as f:
                f.write(text)
        move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_tiny_clip(out_dir, seed=0, image_size=32):
    """A random-weight CLIPModel folder (text and vision towers 32 wide, 16-dim projection, image_size px images) with
    the real CLIP vocabulary and a CLIPImageProcessor config, loadable by CLIPModel/CLIPProcessor.from_pretrained
    offline: the stand-in of a CLIP scorer (--eval_clip_model) in tests."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-clip-", dir=parent)
    try:
        with tempfile.TemporaryDirectory() as vocab:
            write_clip_tokenizer_files(vocab, find_clip_vocab())
            CLIPTokenizer.from_pretrained(vocab, model_max_length=77).save_pretrained(staging)
            for name in ("vocab.json", "merges.txt"):  # transformers 4 reads these, 5 writes tokenizer.json only
                shutil.copy(os.path.join(vocab, name), os.path.join(staging, name))
        processor.save_pretrained(staging)
        model.save_pretrained(staging, safe_serialization=True)
        move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", default="tiny",
                        choices=["tiny", "sd15", "tiny-sdxl", "sdxl", *FLOW_SIZES, *BIG_FLOW_SIZES, "tiny-clip"],
                        help="tiny-clip: a tiny random CLIPModel (the stand-in of --eval_clip_model in tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size == "tiny-clip":
        make_tiny_clip(args.out_dir, args.seed)
    else:
        make_pipeline(args.out_dir, args.size, args.seed)
    print(f"wrote {args.size} {'model' if args.size == 'tiny-clip' else 'pipeline'} to {args.out_dir}")


if __name__ == "__main__":
    main()
