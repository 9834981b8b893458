"""Sampling validation images and saving the full pipeline (PyTorch), for every family."""

import os

import numpy as np
import torch

from textual_inversion_core import plots


def pipeline_class(family):
    """diffusers' pipeline class of a family (torch_backend.families)."""
    import diffusers

    return getattr(diffusers, family.spec.pipeline_class)


def _components(models):
    """The pipeline's text side: text_encoder/tokenizer, text_encoder_2/tokenizer_2, ... (a freed encoder is None)."""
    parts = {}
    for encoder, text_encoder, tokenizer in zip(models.encoders, models.text_encoders, models.tokenizers):
        parts[encoder.subfolder], parts[encoder.tokenizer] = text_encoder, tokenizer
    return parts


def run_validation(args, accelerator, models, step):
    """Sample images with the current vectors; save them under output_dir/validation/ and send them to
    every tracker of the run (TensorBoard, wandb, comet_ml)."""
    from diffusers import DPMSolverMultistepScheduler

    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if models.family.spec.name == "sd" else {}
    pipeline = pipeline_class(models.family)(
        vae=models.vae, unet=models.denoiser, scheduler=DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
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
    """The whole pipeline in fp32 with the extended tokenizer(s) and text encoder(s) of the trained encoders.

    Every weight but the learned rows comes from the model's own files in fp32 (not from the
    training copies, which --mixed_precision rounded), so the saved denoiser/VAE are the originals.
    learned_vectors: what the family's output_vectors gave (one array for SD-1.x/2.x, else {file key: array});
    placeholder_id_sets: the placeholder ids of each trained encoder."""
    from textual_inversion_core.hf_layout import add_text_model_prefix, move_into

    family = models.family
    vector_sets = [learned_vectors] if not isinstance(learned_vectors, dict) else \
        [learned_vectors[family.spec.encoders[i].file_key] for i in family.trained]
    parts = {}
    for n, i in enumerate(family.trained):
        encoder = family.spec.encoders[i]
        text_encoder = family.load_text_encoder(i).to(torch.float32)  # a --variant fp16 file is upcast exactly
        rows = max(len(models.tokenizers[i]), text_encoder.get_input_embeddings().weight.shape[0])
        text_encoder.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[placeholder_id_sets[n]] = torch.from_numpy(
                np.asarray(vector_sets[n], np.float32))
        parts[encoder.subfolder], parts[encoder.tokenizer] = text_encoder, models.tokenizers[i]
    pipeline = pipeline_class(family).from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=torch.float32,
        **parts)
    staging = os.path.join(output_dir, ".tmp-pipeline")
    pipeline.save_pretrained(staging)
    for encoder in family.spec.encoders:
        if encoder.kind == "clip":
            add_text_model_prefix(os.path.join(staging, encoder.subfolder))
    move_into(staging, output_dir)
