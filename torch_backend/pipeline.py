"""Sampling validation images and saving the full pipeline (PyTorch), for SD-1.x/2.x and SDXL."""

import os

import numpy as np
import torch

from textual_inversion_core import plots

from .model import TEXT_ENCODER_FOLDERS, load_text_encoder


def pipeline_class(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _components(models):
    """The pipeline's text side: text_encoder/tokenizer, and for SDXL text_encoder_2/tokenizer_2."""
    parts = {}
    for i, (text_encoder, tokenizer) in enumerate(zip(models.text_encoders, models.tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts["text_encoder" + suffix], parts["tokenizer" + suffix] = text_encoder, tokenizer
    return parts


def run_validation(args, accelerator, models, step):
    """Sample images with the current vectors; save them under output_dir/validation/ and send them to
    every tracker of the run (TensorBoard, wandb, comet_ml)."""
    from diffusers import DPMSolverMultistepScheduler

    extra = {} if models.family == "sdxl" else dict(safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    pipeline = pipeline_class(models.family)(
        vae=models.vae, unet=models.unet, scheduler=DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
        **_components(models), **extra)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    images = []
    with torch.no_grad(), accelerator.autocast():
        for _ in range(args.num_validation_images):
            images.append(pipeline(args.validation_prompt, num_inference_steps=25, generator=generator,
                                   height=args.resolution, width=args.resolution).images[0])
    paths = plots.save_validation_images(args.output_dir, step, images)
    log_validation_images(accelerator.trackers, images, args.validation_prompt, step)
    return paths


def log_validation_images(trackers, images, prompt, step):
    """The validation images to each Accelerate tracker, under the name "validation"."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{i}: {prompt}") for i, im in enumerate(images)]},
                        step=step)
        elif tracker.name == "comet_ml":
            for i, im in enumerate(images):
                tracker.writer.log_image(im, name=f"validation_{i}", step=step)


def save_full_pipeline(args, output_dir, models, learned_vectors, placeholder_id_sets):
    """The whole pipeline in fp32 with the extended tokenizer(s) and text encoder(s).

    Every weight but the learned rows comes from the model's own files in fp32 (not from the
    training copies, which --mixed_precision rounded), so the saved UNet/VAE are the originals.
    learned_vectors: one array (SD-1.x/2.x) or {"clip_l", "clip_g"} (SDXL)."""
    from textual_inversion_core.hf_layout import add_text_model_prefix, move_into

    vector_sets = [learned_vectors] if not isinstance(learned_vectors, dict) else \
        [learned_vectors["clip_l"], learned_vectors["clip_g"]]
    parts = {}
    for i, folder in enumerate(TEXT_ENCODER_FOLDERS[models.family]):
        text_encoder = load_text_encoder(args, folder).to(torch.float32)  # a --variant fp16 file is upcast exactly
        text_encoder.resize_token_embeddings(len(models.tokenizers[i]), mean_resizing=False)
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[placeholder_id_sets[i]] = torch.from_numpy(
                np.asarray(vector_sets[i], np.float32))
        suffix = "" if i == 0 else f"_{i + 1}"
        parts["text_encoder" + suffix], parts["tokenizer" + suffix] = text_encoder, models.tokenizers[i]
    pipeline = pipeline_class(models.family).from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=torch.float32,
        **parts)
    staging = os.path.join(output_dir, ".tmp-pipeline")
    pipeline.save_pretrained(staging)
    for folder in TEXT_ENCODER_FOLDERS[models.family]:
        add_text_model_prefix(os.path.join(staging, folder))
    move_into(staging, output_dir)
