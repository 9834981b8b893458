"""Trackers, validation sampling and saving the full pipeline (Flax)."""

import json
import logging
import os
import shutil
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from textual_inversion_core import plots
from textual_inversion_core.cli import public_config
from textual_inversion_core.hf_layout import move_into

from .model import add_placeholder_rows, exact_gelu_interceptor, merged_text_encoder_params
from .weights import load_component


class Trackers:
    """TensorBoard (through torch's or tensorboardX's SummaryWriter) and/or wandb, on process 0."""

    def __init__(self, args, trackers, enabled):
        """trackers: the names chosen by textual_inversion_core.trackers.select_trackers."""
        self.tensorboard, self.wandb = None, None
        if not enabled or not trackers:
            return
        config = {k: (",".join(v) if isinstance(v, list) else v) for k, v in public_config(args).items()}
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=os.path.join(args.output_dir, args.logging_dir, "textual_inversion"))
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        if "wandb" in trackers:
            import wandb

            self.wandb = wandb.init(project="textual_inversion", config=config)

    def log(self, values, step):
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, images, step):
        if self.tensorboard is not None:
            self.tensorboard.add_images("validation", np.stack(images), step, dataformats="NHWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"validation": [wandb.Image(im) for im in images]}, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def flax_scheduler_for(config, fallback="FlaxPNDMScheduler"):
    """The Flax twin of the model's scheduler class (PNDMScheduler -> FlaxPNDMScheduler)."""
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name if name.startswith("Flax") else "Flax" + name, None) or getattr(diffusers, fallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(config)


def build_pipeline(models, tokenizers, scheduler):
    """FlaxStableDiffusionPipeline, or FlaxStableDiffusionXLPipeline when there are two text encoders."""
    from diffusers import FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # the no-safety-checker notice is expected here
    if "text_encoder_2" in models:
        return FlaxStableDiffusionXLPipeline(
            vae=models["vae"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
            tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=models["unet"], scheduler=scheduler)
    return FlaxStableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizers[0],
                                       unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None)


class Validator:
    """Samples num_validation_images with the current vectors (25 DPM-Solver steps, as the PyTorch script).

    The sampling function is jitted once and reused by every validation round (the params are its
    arguments, so new vectors need no recompilation).
    """

    def __init__(self, args, models, tokenizers, scheduler_config):
        from diffusers import FlaxDPMSolverMultistepScheduler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler = FlaxDPMSolverMultistepScheduler.from_config(scheduler_config)
        self.pipeline = build_pipeline(models, tokenizers, self.scheduler)
        self.args = args
        self.prompt_ids = jnp.asarray(self.pipeline.prepare_inputs([args.validation_prompt] * args.num_validation_images))
        self.generate = jax.jit(self.pipeline._generate, static_argnums=(3, 4, 5))

    def __call__(self, params, step, trackers):
        args = self.args
        params = dict(params, scheduler=self.scheduler.create_state())
        rng = jax.random.PRNGKey(args.seed or 0)
        with nn.intercept_methods(exact_gelu_interceptor):  # the UNet as trained, see exact_gelu_interceptor
            # guidance as a 0-d array: FlaxStableDiffusionPipeline broadcasts a list wrongly for batches > 1.
            images = self.generate(self.prompt_ids, params, rng, 25, args.resolution, args.resolution,
                                   jnp.asarray(7.5, jnp.float32))
        images = self.pipeline.numpy_to_pil(np.asarray(images))
        paths = plots.save_validation_images(args.output_dir, step, images)
        trackers.images([np.asarray(im) for im in images], step)
        return paths


def full_precision_params(folder, variant, params, weight_dtype, vocab_sizes, placeholder_id_sets, vector_sets):
    """fp32 params of the pipeline to save, with the learned rows merged in. Under bf16 the training copies
    are rounded, so the text encoder(s) and UNet are read again from the model's files; the VAE is fp32 already."""
    if weight_dtype == jnp.float32:
        return params
    fresh = {"vae": params["vae"]}
    names = ("text_encoder", "text_encoder_2")[: len(vector_sets)]
    for name, vocab_size, placeholder_ids, vectors in zip(names, vocab_sizes, placeholder_id_sets, vector_sets):
        text_encoder, te_params, _ = load_component(folder, name, variant, jnp.float32)
        add_placeholder_rows(text_encoder, te_params, vocab_size, placeholder_ids, np.asarray(vectors, np.float32))
        fresh[name] = merged_text_encoder_params(jax.tree.map(jnp.asarray, te_params), placeholder_ids, vectors)
    _, fresh["unet"], _ = load_component(folder, "unet", variant, jnp.float32)
    return fresh


def save_full_pipeline(args, output_dir, models, params, tokenizers, scheduler_config):
    """A Flax pipeline folder (fp32, extended tokenizer(s)/text encoder(s)); nothing downloaded.
    params: full-precision (see full_precision_params)."""
    scheduler = flax_scheduler_for(scheduler_config)
    if getattr(models["unet"], "use_memory_efficient_attention", False):
        # How attention is computed is a runtime choice; the saved config stays the plain one.
        models = dict(models, unet=models["unet"].clone(use_memory_efficient_attention=False))
    pipeline = build_pipeline(models, tokenizers, scheduler)
    fp32 = {k: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), v) for k, v in params.items()}
    staging = os.path.join(output_dir, ".tmp-pipeline")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, params=fp32)
    move_into(staging, output_dir)
