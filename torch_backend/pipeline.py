"""Sampling validation images and saving the full pipeline (PyTorch)."""

import os

import numpy as np
import torch

from textual_inversion_core import plots

from .model import load_text_encoder


def run_validation(args, accelerator, text_encoder, tokenizer, unet, vae, noise_scheduler, step):
    """Sample images with the current vectors; save them under output_dir/validation/ and send them to
    every tracker of the run (TensorBoard, wandb, comet_ml)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
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


def save_full_pipeline(args, output_dir, tokenizer, learned_vectors, placeholder_ids):
    """The whole pipeline in fp32 with the extended tokenizer and text encoder.

    Every weight but the learned rows comes from the model's own files in fp32 (not from the
    training copies, which --mixed_precision rounded), so the saved UNet/VAE are the originals."""
    from diffusers import StableDiffusionPipeline

    from textual_inversion_core.hf_layout import add_text_model_prefix, move_into

    text_encoder = load_text_encoder(args).to(torch.float32)  # a --variant fp16 file is upcast exactly
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[placeholder_ids] = torch.from_numpy(np.asarray(learned_vectors))
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, text_encoder=text_encoder, tokenizer=tokenizer,
        revision=args.revision, variant=args.variant, torch_dtype=torch.float32)
    staging = os.path.join(output_dir, ".tmp-pipeline")
    pipeline.save_pretrained(staging)
    add_text_model_prefix(os.path.join(staging, "text_encoder"))
    move_into(staging, output_dir)
