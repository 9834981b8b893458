#!/usr/bin/env python
"""Pretrain a tiny text-to-image Stable Diffusion pipeline on coloured shapes, on CPU, from scratch.

    OMP_NUM_THREADS=1 .venv/bin/python tools/pretrain_shapes_model.py tests/assets/shapes-sd --seed 0

Writes a normal StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/ with
`text_model.`-prefixed keys, tokenizer/ with the real CLIP vocabulary, scheduler/) that
textual_inversion.py trains on unchanged, plus pretraining.json (the command, times and losses).
The domain and the held-out pairs (never captioned, never drawn) are defined in tools/shapes.py.

Two stages: (1) a small AutoencoderKL (32 px -> 4x16x16 latents) on reconstruction; (2) the UNet
and a small CLIP text encoder, jointly, on the denoising loss with captions built from the
textual-inversion prompt templates, 10% empty captions (for classifier-free guidance) and an EMA of
the weights. Weights are stored in fp16 to keep the folder small (the CLIP vocabulary alone is
49408 rows). Deterministic for a seed and a thread count. At the end the saved (fp16) pipeline is
measured: judge accuracy on fresh images, and how often the words of each pair generate that pair.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from textual_inversion_core.data import OBJECT_TEMPLATES  # noqa: E402
from tools import shapes  # noqa: E402
from tools.make_tiny_pipeline import find_clip_vocab, save_pipeline_folder, write_clip_tokenizer_files  # noqa: E402

RESOLUTION = 32
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def model_configs(text_width):
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
               latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)
    unet = dict(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32)
    text = dict(vocab_size=49408, hidden_size=text_width, intermediate_size=2 * text_width, num_attention_heads=4,
                num_hidden_layers=3, max_position_embeddings=77, projection_dim=text_width,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return vae, unet, text


def make_images(count, seed):
    """count images of every pair but the held-out one, as float [-1, 1] NCHW, with their labels."""
    rng = np.random.default_rng([seed, 1])
    labels = [shapes.sample_pair(rng) for _ in range(count)]
    pixels = np.stack([shapes.render(c, s, rng, RESOLUTION) for c, s in labels])
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2), labels


def cosine_lr(step, total, peak, warmup):
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, images, steps, batch, lr, seed, log):
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = torch.from_numpy(images)
    vae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 100)
        x = data[torch.randint(0, len(data), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        # A tiny KL weight keeps the latent scale bounded without blurring the reconstruction.
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()
    return float(loss.item())


def train_diffusion(unet, text_encoder, tokenizer, latent_mean, latent_std, labels, args, log, snapshot=None):
    """Joint UNet + text encoder training; returns the mean loss of each block of 200 steps.

    snapshot(step, ema_weights, params), if given, is called every args.snapshot_every steps.
    """
    import torch
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    rng = np.random.default_rng([args.seed, 2])
    generator = torch.Generator().manual_seed(args.seed + 2)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    unet.train()
    text_encoder.train()
    losses, block_means = [], []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, 200)
        index = rng.integers(0, len(labels), args.batch)
        captions = []
        for i in index:
            if rng.uniform() < 0.1:
                captions.append("")
            else:
                template = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))]
                captions.append(template.format(shapes.caption_phrase(*labels[i], rng)))
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        idx = torch.from_numpy(index)
        latents = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, params):
                shadow.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            block_means.append(round(float(np.mean(losses[-200:])), 5))
        if step % 200 == 0 or step == args.steps - 1:
            log(f"diffusion step {step}/{args.steps} loss(avg 200) {np.mean(losses[-200:]):.4f}")
        if snapshot is not None and args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.steps:
            snapshot(step + 1, ema, params)
    with torch.no_grad():
        for shadow, p in zip(ema, params):
            p.copy_(shadow)
    unet.eval()
    text_encoder.eval()
    return float(np.mean(losses[-500:])), block_means


def save_pipeline(out_dir, vae, unet, text_encoder, tokenizer_dir, report):
    """Save fp16 copies of the models as a pipeline folder (the models passed in stay fp32)."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    half = [copy.deepcopy(m).half() for m in (vae, text_encoder, unet)]
    pipe = StableDiffusionPipeline(vae=half[0], text_encoder=half[1], tokenizer=tokenizer, unet=half[2],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    save_pipeline_folder(pipe, tokenizer_dir, out_dir,
                         extra_files={"pretraining.json": json.dumps(report, indent=2) + "\n"})


def measure_saved_pipeline(out_dir, log):
    """Judge accuracy and prompt following of the pipeline as saved (fp16 weights, run in fp32)."""
    pipe = shapes.load_pipeline(out_dir)
    rates = shapes.prompt_following(pipe)
    held_out = {" ".join(c) for c in shapes.HELD_OUT}
    seen = [rate for name, rate in rates.items() if name in {f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES}
            and name not in held_out]
    summary = {"judge_accuracy_on_fresh_images": shapes.judge_accuracy(),
               "seen_pairs_judged_rate_mean": round(float(np.mean(seen)), 4),
               "seen_pairs_judged_rate_min": round(float(np.min(seen)), 4),
               "prompt_following_16_samples": {k: round(v, 4) for k, v in rates.items()}}
    log(f"prompt following: seen pairs mean {summary['seen_pairs_judged_rate_mean']:.3f}, held out by words "
        + ", ".join(f"{name} {rates[name]:.2f}" for name in sorted(held_out)))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=16000, help="procedural training images")
    parser.add_argument("--vae_steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=6000, help="UNet + text encoder steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--text_width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these tiny kernels, especially on a busy machine)")
    parser.add_argument("--snapshot_every", type=int, default=0,
                        help="also save the EMA weights every N steps to SNAPSHOT_DIR/step-N (to see what longer training buys)")
    parser.add_argument("--snapshot_dir", default=None)
    args = parser.parse_args(argv)
    if args.snapshot_every and not args.snapshot_dir:
        parser.error("--snapshot_every needs --snapshot_dir")

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(args.threads)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    vae_cfg, unet_cfg, text_cfg = model_configs(args.text_width)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_cfg)
    unet = UNet2DConditionModel(**unet_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    images, labels = make_images(args.images, args.seed)
    log(f"{len(images)} images; params: vae {sum(p.numel() for p in vae.parameters())}, "
        f"unet {sum(p.numel() for p in unet.parameters())}, text {sum(p.numel() for p in text_encoder.parameters())}")

    vae_loss = train_vae(vae, images, args.vae_steps, 32, 3e-3, args.seed + 1, log)
    vae_seconds = time.time() - started
    with torch.no_grad():
        dists = [vae.encode(torch.from_numpy(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        recon = vae.decode(mean[:600]).sample
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    recon_pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    judge_on_recon = float(np.mean([shapes.judge(im) == lab for im, lab in zip(recon_pixels, labels[:600])]))
    log(f"latent scaling factor {scaling:.4f}; judge accuracy on VAE reconstructions {judge_on_recon:.3f}")

    command = "python tools/pretrain_shapes_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "held_out": [" ".join(c) for c in shapes.HELD_OUT],
              "dev_concept": " ".join(shapes.DEV_CONCEPT), "measured_concept": " ".join(shapes.MEASURED_CONCEPT),
              "resolution": RESOLUTION, "threads": args.threads, "images": args.images, "steps": args.steps,
              "batch": args.batch, "vae_final_loss": round(vae_loss, 5),
              "judge_accuracy_on_vae_reconstructions": judge_on_recon, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_clip_tokenizer_files(tokenizer_dir, find_clip_vocab())
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)

        def snapshot(step, ema, params):
            import copy

            models = copy.deepcopy((unet, text_encoder))
            with torch.no_grad():
                for shadow, p in zip(ema, list(models[0].parameters()) + list(models[1].parameters())):
                    p.copy_(shadow)
            folder = os.path.join(args.snapshot_dir, f"step-{step}")
            save_pipeline(folder, vae, models[0].eval(), models[1].eval(), tokenizer_dir,
                          dict(report, snapshot_of_step=step, seconds=round(time.time() - started, 1)))
            log(f"snapshot {folder}")

        diffusion_loss, block_means = train_diffusion(unet, text_encoder, tokenizer, mean * scaling, std * scaling,
                                                      labels, args, log, snapshot)
        report.update(vae_seconds=round(vae_seconds, 1), total_seconds=round(time.time() - started, 1),
                      diffusion_loss_last_500_steps=round(diffusion_loss, 5),
                      diffusion_loss_per_200_steps=block_means)
        save_pipeline(args.out_dir, vae, unet, text_encoder, tokenizer_dir, report)
    # Measured after saving: the numbers describe the fp16 folder users get, not the fp32 weights in memory.
    report.update(measure_saved_pipeline(args.out_dir, log))
    report["measure_seconds"] = round(time.time() - started - report["total_seconds"], 1)
    from textual_inversion_core.atomic import atomic_path

    with atomic_path(os.path.join(args.out_dir, "pretraining.json")) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out_dir}: {json.dumps(report)}")


if __name__ == "__main__":
    main()
