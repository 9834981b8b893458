#!/usr/bin/env python
"""The plain Textual Inversion loop the benchmark compares against (not a product; bench only).

It does, step for step, what the usual diffusers example does, so its speed is the baseline users
know: every __getitem__ opens, resizes, flips and tokenises an image again; every step runs the VAE
encoder on the batch and samples its posterior; AdamW optimises the whole 49408 x dim token
embedding matrix (text encoder kept fp32 as trainable), and after each step every row except the
placeholder's is copied back from a saved original. Flags are the trainer's (same parser), so the
harness can give both programs the same command line; flags this loop has no use for are ignored.
"""

import math
import os
import random
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from textual_inversion_core.cli import parse_args  # noqa: E402
from textual_inversion_core.data import find_images, placeholder_tokens_for, templates_for  # noqa: E402


class PerStepDataset:
    """Decodes, resizes, flips and tokenises on every access, like the example's Dataset."""

    def __init__(self, folder, tokenizer, placeholder_string, size, repeats, learnable_property, center_crop):
        self.paths = find_images(folder)
        self.tokenizer = tokenizer
        self.placeholder_string = placeholder_string
        self.size = size
        self.center_crop = center_crop
        self.templates = templates_for(learnable_property)
        self.length = len(self.paths) * repeats

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        import torch

        text = random.choice(self.templates).format(self.placeholder_string)
        ids = self.tokenizer(text, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        image = Image.open(self.paths[i % len(self.paths)]).convert("RGB")
        if self.center_crop:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        image = image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image).astype(np.float32) / 127.5 - 1.0
        return {"pixel_values": torch.from_numpy(pixels).permute(2, 0, 1), "input_ids": ids}


def main(argv=None):
    args = parse_args(argv, prog="reference_loop.py")

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    seed = 0 if args.seed is None else args.seed
    random.seed(seed)
    torch.manual_seed(seed)

    model = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")

    tokens = placeholder_tokens_for(args.placeholder_token, args.num_vectors)
    tokenizer.add_tokens(tokens)
    placeholder_ids = tokenizer.convert_tokens_to_ids(tokens)
    initializer_id = tokenizer.encode(args.initializer_token, add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id in placeholder_ids:
            table[token_id] = table[initializer_id].clone()

    # Everything frozen except the token embedding matrix, which is trained as a whole.
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened text_model
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.train()
        text_encoder.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()

    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    dataset = PerStepDataset(args.train_data_dir, tokenizer, " ".join(tokens), args.resolution, args.repeats,
                             args.learnable_property, args.center_crop)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                         num_workers=args.dataloader_num_workers)
    max_steps = args.max_train_steps or args.num_train_epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    text_encoder.train()
    text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(text_encoder, optimizer, loader, lr_scheduler)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)

    # Rows that must stay as they were: restored after every optimizer step.
    original_table = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight.data.clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[min(placeholder_ids): max(placeholder_ids) + 1] = False

    progress = tqdm(range(max_steps), desc="Steps", disable=not accelerator.is_local_main_process)
    step = 0
    while step < max_steps:
        for batch in loader:
            with accelerator.accumulate(text_encoder):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample().detach()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"])[0].to(dtype=weight_dtype)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    weight = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight
                    weight[keep] = original_table[keep]
            if accelerator.sync_gradients:
                step += 1
                progress.update(1)
                progress.set_postfix(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            if step >= max_steps:
                break
    progress.close()

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        learned = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight[placeholder_ids]
        torch.save({args.placeholder_token: learned.detach().cpu()}, os.path.join(args.output_dir, "learned_embeds.bin"))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
