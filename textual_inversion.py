#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion with PyTorch and Accelerate.

    accelerate launch textual_inversion.py --pretrained_model_name_or_path=MODEL \
        --train_data_dir=DIR --placeholder_token="<cat-toy>" --initializer_token="toy" ...

Reads top to bottom: parse -> load -> prepare -> loop -> save. Only the placeholder vectors are
trainable; everything else is frozen. VAE posteriors are cached per (image, flip), so the VAE
encoder runs once per image instead of once per step. All randomness of an example (image order,
flip, template, posterior sample, noise, timestep) is keyed by its global index, which makes
resuming exact and a run on N processes equal to one process with the same global batch.
"""

import logging
import math
import os
import random
import signal
import sys
import warnings

import numpy as np

from textual_inversion_core import checkpoints, embeddings, hub, outputs, plots
from textual_inversion_core.cli import parse_args, public_config
from textual_inversion_core.data import STREAM_NOISE, example_seed, placeholder_tokens_for
from textual_inversion_core.errors import UserError, run_cli
from textual_inversion_core.preflight import fit_init_vectors, load_run_inputs
from textual_inversion_core.schedules import lr_multiplier

logger = logging.getLogger("textual_inversion")


# --------------------------------------------------------------------------------------------------
# Model pieces


def make_placeholder_embedding(torch):
    nn = torch.nn

    class PlaceholderEmbedding(nn.Module):
        """The text encoder's token embedding with the placeholder rows taken from a small parameter.

        The full matrix stays frozen (and bit-identical); `vectors` [num_vectors, dim] is the only
        trainable tensor, so the optimizer state and the gradient are num_vectors x dim, not 49408 x dim.
        """

        def __init__(self, base, placeholder_ids, init_vectors):
            super().__init__()
            self.base = base
            self.register_buffer("placeholder_ids", torch.tensor(placeholder_ids, dtype=torch.long), persistent=False)
            self.vectors = nn.Parameter(init_vectors.detach().clone().float())

        @property
        def weight(self):
            return self.base.weight

        @property
        def num_embeddings(self):
            return self.base.num_embeddings

        @property
        def embedding_dim(self):
            return self.base.embedding_dim

        def forward(self, input_ids):
            out = self.base(input_ids)
            match = input_ids.unsqueeze(-1) == self.placeholder_ids  # [..., num_vectors] one-hot
            picked = match.to(self.vectors.dtype) @ self.vectors  # exact: one 1.0 per row
            return torch.where(match.any(-1, keepdim=True), picked.to(out.dtype), out)

        def merged(self):
            """A plain nn.Embedding with the learned rows written in (for saving a full pipeline)."""
            plain = nn.Embedding(self.base.num_embeddings, self.base.embedding_dim)
            plain.weight.data = self.base.weight.detach().clone().float()
            plain.weight.data[self.placeholder_ids] = self.vectors.detach().float()
            return plain.to(self.base.weight.dtype)

    return PlaceholderEmbedding


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors, initializer_token):
    """Add <tok>, <tok>_1, ... to the tokenizer; return (their ids, the initializer's id)."""
    tokens = placeholder_tokens_for(placeholder_token, num_vectors)
    base_vocab = tokenizer.get_vocab()
    for tok in tokens:
        existing = tokenizer.encode(tok, add_special_tokens=False)
        if tok in base_vocab or tok in tokenizer.get_added_vocab() or (len(existing) == 1 and existing[0] < len(base_vocab)):
            raise UserError(f"--placeholder_token {tok!r} is already in the tokenizer's vocabulary; "
                            "pick a new string such as <my-concept>")
    # Encoded before the new tokens exist: the initializer must be a word of the original vocabulary.
    init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(init_ids)
        raise UserError(f"--initializer_token {initializer_token!r} is {len(init_ids)} tokens ({' '.join(pieces)}), "
                        "it must be a single token; use one common word such as 'toy' or 'painting'")
    added = tokenizer.add_tokens(tokens)
    if added != num_vectors:
        raise UserError(f"--placeholder_token {placeholder_token!r} clashes with existing tokens; pick a new string such as <my-concept>")
    return tokenizer.convert_tokens_to_ids(tokens), init_ids[0]


def check_optional_features(args):
    """Fail fast, in one line, on features this machine cannot provide."""
    if args.enable_xformers_memory_efficient_attention:
        import importlib.util

        import torch

        if importlib.util.find_spec("xformers") is None:
            raise UserError("--enable_xformers_memory_efficient_attention needs the xformers package; "
                            "pip install xformers (CUDA only) or drop the flag: PyTorch SDPA attention is used by default")
        if not torch.cuda.is_available():
            raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; "
                            "drop the flag on this machine (PyTorch SDPA attention is used by default)")
    wanted = {"all": ["tensorboard", "wandb", "comet_ml"], "none": []}.get(args.report_to, [args.report_to])
    import importlib.util

    for tracker in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}[tracker]
        if importlib.util.find_spec(module) is None and not (tracker == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise UserError(f"--report_to {args.report_to} needs the {module} package; pip install {module} or pass --report_to none")


def load_models(args, torch):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = args.pretrained_model_name_or_path
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")) \
            and not os.path.isdir(os.path.join(model, "unet")):
        raise UserError(f"--pretrained_model_name_or_path {model!r} is not a Stable Diffusion pipeline folder "
                        "(no model_index.json or unet/); point it at the folder that holds unet/, vae/, text_encoder/")
    common = dict(revision=args.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or model,
                                                  subfolder=None if args.tokenizer_name else "tokenizer", **common)
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **common)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", variant=args.variant, **common)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant=args.variant, **common)
    except (OSError, ValueError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model {model!r} ({first}); check the path or hub id, --revision and --variant") from err
    return tokenizer, noise_scheduler, text_encoder, vae, unet


def verify_text_encoder_loaded(text_encoder, model_path, torch):
    """Guard against the transformers-4/5 key-prefix trap: the loaded embedding must be the file's."""
    folder = os.path.join(model_path, "text_encoder")
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
    if len(files) != 1:
        return
    from safetensors import safe_open

    with safe_open(os.path.join(folder, files[0]), framework="pt") as f:
        key = next((k for k in f.keys() if k.endswith("embeddings.token_embedding.weight")), None)
        if key is None:
            return
        stored = f.get_tensor(key)
    loaded = text_encoder.get_input_embeddings().weight
    if stored.shape != loaded.shape or not torch.equal(stored.to(loaded.dtype), loaded.detach().cpu()):
        raise UserError(f"the text encoder in {folder!r} did not load its own weights (key layout mismatch); "
                        "re-save it with the transformers version in requirements.txt")


def denoising_loss(text_encoder, unet, noise_scheduler, latents, noise, timesteps, input_ids, weight_dtype):
    """The Textual Inversion objective: MSE between the UNet's prediction and the scheduler's target
    (the noise for epsilon models, the velocity for v_prediction models), computed in fp32."""
    import torch.nn.functional as F

    encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=weight_dtype)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps).to(dtype=weight_dtype)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


# --------------------------------------------------------------------------------------------------
# Outputs


def save_progress(args, output_dir, vectors, suffix=""):
    embeddings.write_diffusers(output_dir, args.placeholder_token, vectors,
                               safe_serialization=not args.no_safe_serialization, suffix=suffix)


def save_full_pipeline(args, output_dir, text_encoder, tokenizer, unet, torch):
    from diffusers import StableDiffusionPipeline

    from textual_inversion_core.hf_layout import add_text_model_prefix, move_into

    text_encoder.set_input_embeddings(text_encoder.get_input_embeddings().merged())
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        revision=args.revision, variant=args.variant, torch_dtype=torch.float32)
    staging = os.path.join(output_dir, ".tmp-pipeline")
    pipeline.save_pretrained(staging)
    add_text_model_prefix(os.path.join(staging, "text_encoder"))
    move_into(staging, output_dir)


def run_validation(args, accelerator, text_encoder, tokenizer, unet, vae, noise_scheduler, weight_dtype, step, torch):
    """Sample images with the current vectors; save them under output_dir/validation/ and to trackers."""
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
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
    return paths


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv, prog="textual_inversion.py")

    # ---- Checks that need no model: fail in seconds, not after loading gigabytes.
    check_optional_features(args)
    dataset, resume_path, resume_tensors, resume_state, init_vectors = load_run_inputs(args)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    hub_repo_id = hub.preflight(args) if args.push_to_hub and accelerator.is_main_process else None
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Seed: from the flag, the checkpoint being resumed, or drawn once and shared by every process.
    seed = [args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)]
    if resume_state is not None:
        if args.seed is not None and args.seed != resume_state["seed"]:
            logger.warning("--seed %s differs from the checkpoint's %s; using the checkpoint's", args.seed, resume_state["seed"])
        seed = [resume_state["seed"]]
    if accelerator.num_processes > 1:
        broadcast_object_list(seed)
    args.seed = seed = int(seed[0])
    dataset.seed = seed
    torch.manual_seed(seed)

    # ---- Load
    tokenizer, noise_scheduler, text_encoder, vae, unet = load_models(args, torch)
    if os.path.isdir(args.pretrained_model_name_or_path):
        verify_text_encoder_loaded(text_encoder, args.pretrained_model_name_or_path, torch)
    placeholder_ids, initializer_id = add_placeholder_tokens(
        tokenizer, args.placeholder_token, args.num_vectors, args.initializer_token)
    placeholder_string = " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
    dataset.tokenize(tokenizer, placeholder_string)

    # ---- Prepare: freeze everything, then make the placeholder vectors the one trainable tensor.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # new rows are overwritten below
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    base_embedding = text_encoder.get_input_embeddings()
    dim = base_embedding.embedding_dim
    init_vectors = fit_init_vectors(args, init_vectors, dim)
    if init_vectors is not None:
        start = torch.from_numpy(init_vectors)
    else:
        start = base_embedding.weight.data[initializer_id].float().repeat(args.num_vectors, 1)
    with torch.no_grad():
        base_embedding.weight[placeholder_ids] = start.to(base_embedding.weight.dtype)
    embedding = make_placeholder_embedding(torch)(base_embedding, placeholder_ids, start)
    text_encoder.set_input_embeddings(embedding)
    vectors = embedding.vectors

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    # The VAE stays fp32: its posterior is computed once per image and cached exactly.
    vae.to(device, dtype=torch.float32)
    unet.to(device, dtype=weight_dtype)
    base_embedding.to(dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    vectors.data = vectors.data.float()
    unet.eval()
    text_encoder.eval()
    if args.gradient_checkpointing:
        # Both only checkpoint in train mode; neither has dropout in SD configs, so outputs are the same.
        text_encoder.gradient_checkpointing_enable()
        text_encoder.train()
        unet.enable_gradient_checkpointing()
        unet.train()

    world = accelerator.num_processes
    if args.scale_lr:
        args.learning_rate = args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * world
    optimizer = torch.optim.AdamW([vectors], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    optimizer = accelerator.prepare(optimizer)

    global_batch = args.train_batch_size * world
    steps_per_epoch = math.ceil(len(dataset) / (global_batch * args.gradient_accumulation_steps))
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    validation_steps = args.validation_steps
    if args.validation_epochs is not None:
        validation_steps = args.validation_epochs * steps_per_epoch

    global_step = 0
    if resume_state is not None:
        if resume_state.get("num_vectors") != args.num_vectors or resume_tensors["vectors"].shape[1] != dim:
            raise UserError(f"checkpoint {resume_path!r} was made with other --num_vectors or another model; "
                            "resume with the original settings or start a new --output_dir")
        if resume_state.get("global_batch") != global_batch * args.gradient_accumulation_steps:
            logger.warning("the checkpoint was trained with another global batch; the resumed run will not "
                           "match an uninterrupted one")
        with torch.no_grad():
            vectors.copy_(torch.from_numpy(resume_tensors["vectors"]))
        if "exp_avg" in resume_tensors:
            state = optimizer.state_dict()
            state["state"] = {0: {"step": torch.tensor(float(resume_state["optimizer_step"])),
                                  "exp_avg": torch.from_numpy(resume_tensors["exp_avg"]).to(device),
                                  "exp_avg_sq": torch.from_numpy(resume_tensors["exp_avg_sq"]).to(device)}}
            optimizer.load_state_dict(state)
        global_step = int(resume_state["step"])
        logger.info("resumed from %s at step %d", resume_path, global_step)
    elif args.resume_from_checkpoint:
        logger.warning("--resume_from_checkpoint %s: no checkpoint in %s yet, starting a new run",
                       args.resume_from_checkpoint, args.output_dir)

    def checkpoint_state():
        adam = optimizer.state_dict()["state"].get(0, {})
        tensors = {"vectors": vectors.detach().float().cpu().numpy()}
        if adam:
            tensors["exp_avg"] = adam["exp_avg"].float().cpu().numpy()
            tensors["exp_avg_sq"] = adam["exp_avg_sq"].float().cpu().numpy()
        state = {"seed": seed, "num_vectors": args.num_vectors, "placeholder_token": args.placeholder_token,
                 "global_batch": global_batch * args.gradient_accumulation_steps, "framework": "pytorch",
                 "optimizer_step": float(adam["step"]) if adam else 0.0, "learning_rate": args.learning_rate}
        return tensors, state

    if accelerator.is_main_process and args.report_to != "none":
        config = {k: (",".join(v) if isinstance(v, list) else v) for k, v in public_config(args).items()}
        accelerator.init_trackers("textual_inversion", config=config)

    # Posterior (mean, std) per (image, flip), filled on first use: no start-up stall.
    latent_cache = {}
    scaling_factor = vae.config.scaling_factor
    prompt_ids = torch.from_numpy(dataset.all_prompt_ids).to(device)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    latent_shape = (vae.config.latent_channels, latent_size, latent_size)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"the model's scheduler predicts {noise_scheduler.config.prediction_type!r}; "
                        "only epsilon and v_prediction are supported")

    def posterior(keys):
        missing = [k for k in dict.fromkeys(keys) if k not in latent_cache]
        if missing:
            # Hand the heap pages glibc keeps after a training step back to the OS before the VAE maps
            # its large buffers on top of them (SD-1.5, 512 px: peak RSS 7.39 -> 6.87 GB while the cache fills).
            try:
                import ctypes

                ctypes.CDLL(None).malloc_trim(0)
            except (OSError, AttributeError):  # not glibc: nothing to do
                pass
            pixels = torch.from_numpy(np.stack([dataset.pixels(*k) for k in missing])).to(device)
            with torch.no_grad():
                dist = vae.encode(pixels).latent_dist
            for k, mean, std in zip(missing, dist.mean, dist.std):
                latent_cache[k] = (mean.float(), std.float())
            if len(latent_cache) == 2 * dataset.num_images and vae.encoder is not None:
                vae.encoder, vae.quant_conv = None, None  # every (image, flip) is cached: free the encoder
        return torch.stack([latent_cache[k][0] for k in keys]), torch.stack([latent_cache[k][1] for k in keys])

    def micro_batch(step, micro):
        """Inputs of this process's share of one micro-batch, all keyed by global example index."""
        first = (step * args.gradient_accumulation_steps + micro) * global_batch + accelerator.process_index * args.train_batch_size
        examples = [dataset.example(first + i) for i in range(args.train_batch_size)]
        mean, std = posterior([(image, flip) for image, flip, _ in examples])
        draws = [torch.Generator().manual_seed(example_seed(seed, first + i, STREAM_NOISE)) for i in range(len(examples))]
        eps = torch.stack([torch.randn(latent_shape, generator=g) for g in draws]).to(device)
        noise = torch.stack([torch.randn(latent_shape, generator=g) for g in draws]).to(device)
        timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in draws]).to(device)
        latents = (mean + std * eps) * scaling_factor
        ids = prompt_ids[torch.tensor([t for _, _, t in examples], device=device)]
        return latents, noise, timesteps, ids

    # Stop cleanly on SIGINT/SIGTERM: finish the step, save, exit.
    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
        except ValueError:  # not the main thread (e.g. under a test harness)
            pass

    logger.info("***** Running training *****")
    logger.info("  images = %d, examples per epoch = %d, processes = %d", dataset.num_images, len(dataset), world)
    logger.info("  batch per device = %d, accumulation = %d, global batch = %d, steps = %d, seed = %d",
                args.train_batch_size, args.gradient_accumulation_steps,
                global_batch * args.gradient_accumulation_steps, max_train_steps, seed)
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    base_lr = args.learning_rate
    loss_history = []  # (step, loss) of this run, drawn to output_dir/loss.png at the end

    # ---- Loop
    while global_step < max_train_steps:
        lr = base_lr * lr_multiplier(args.lr_scheduler, global_step, args.lr_warmup_steps, max_train_steps,
                                     args.lr_num_cycles, base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(args.gradient_accumulation_steps):
            latents, noise, timesteps, ids = micro_batch(global_step, micro)
            with accelerator.autocast():
                loss = denoising_loss(text_encoder, unet, noise_scheduler, latents, noise, timesteps, ids, weight_dtype)
            accelerator.backward(loss / args.gradient_accumulation_steps)
            step_loss += loss.detach() / args.gradient_accumulation_steps
        if world > 1:
            torch.distributed.all_reduce(vectors.grad)
            vectors.grad /= world
        mean_loss = accelerator.reduce(step_loss, reduction="mean") if world > 1 else step_loss
        loss_value = float(mean_loss)
        if not math.isfinite(loss_value):
            progress.close()  # so the error stays the last line on the terminal
            raise UserError(f"loss became {loss_value} at step {global_step + 1}; lower --learning_rate or use fp32. "
                            "The last saved embedding and checkpoint are untouched")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(vectors).all():
            progress.close()
            raise UserError(f"the learned vectors became non-finite at step {global_step + 1}; lower --learning_rate. "
                            "The last saved embedding and checkpoint are untouched")
        global_step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        accelerator.log({"loss": loss_value, "lr": lr}, step=global_step)
        loss_history.append((global_step, loss_value))

        interrupted = bool(stop_signal)
        if world > 1:
            flag = torch.tensor([1.0 if interrupted else 0.0], device=device)
            interrupted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        last = global_step == max_train_steps
        if accelerator.is_main_process:
            if (args.save_steps and global_step % args.save_steps == 0) or (interrupted and not last):
                save_progress(args, args.output_dir, vectors.detach().float().cpu().numpy(), suffix=f"-steps-{global_step}")
            if (args.checkpointing_steps and global_step % args.checkpointing_steps == 0) or (interrupted and not last):
                tensors, state = checkpoint_state()
                path = checkpoints.save_checkpoint(args.output_dir, global_step, tensors, state, args.checkpoints_total_limit)
                logger.info("saved %s", path)
            if args.validation_prompt and validation_steps and global_step % validation_steps == 0:
                run_validation(args, accelerator, text_encoder, tokenizer, unet, vae, noise_scheduler, weight_dtype,
                               global_step, torch)
        accelerator.wait_for_everyone()
        if interrupted and not last:
            logger.warning("stopped by signal at step %d; resume with --resume_from_checkpoint latest", global_step)
            accelerator.end_training()
            return 130
    progress.close()

    # ---- Save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        outputs.finish_run(args, vectors.detach().float().cpu().numpy(), global_step, loss_history, hub_repo_id,
                           lambda: save_full_pipeline(args, args.output_dir, text_encoder, tokenizer,
                                                      unet.to(torch.float32), torch), logger)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
