#!/usr/bin/env python
"""Pretrain a tiny text-to-image pipeline (Stable Diffusion or SD3) on coloured shapes, on CPU, from scratch.

    OMP_NUM_THREADS=1 .venv/bin/python tools/pretrain_shapes_model.py tests/assets/shapes-sd --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python tools/pretrain_shapes_model.py tests/assets/shapes-sd3 --family sd3 \
        --seed 0 --steps 4500

Writes a normal diffusers pipeline folder that textual_inversion.py trains on unchanged, plus pretraining.json
(the command, times and losses). --family sd (the default): a StableDiffusionPipeline (unet/, vae/, text_encoder/
with `text_model.`-prefixed keys, tokenizer/ with the real CLIP vocabulary, a DDIM scheduler/). --family sd3: a
StableDiffusion3Pipeline (transformer/, text_encoder/ and text_encoder_2/ CLIP with projection, text_encoder_3/ T5
with a small locally trained tokenizer_3/, a flow-matching Euler scheduler/). The models of each family are in
tools/shapes_families.py; the domain and the held-out pairs (never captioned, never drawn) in tools/shapes.py.

Two stages: (1) a small AutoencoderKL (32 px -> 4x16x16 latents) on reconstruction, the same in both families;
(2) the denoiser (UNet or transformer) and the text encoder(s), jointly, on the family's loss (DDPM epsilon MSE or
flow matching) with captions built from the textual-inversion prompt templates, 10% empty captions (for
classifier-free guidance; sd3 also drops the CLIP pair's and T5's caption separately) and an EMA of the weights.
Weights are stored in fp16 to keep the folder small (a CLIP vocabulary alone is 49408 rows). Deterministic for a
seed and a thread count. At the end the saved (fp16) pipeline is measured: judge accuracy on fresh images, and how
often the words of each pair generate that pair.
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
from tools import shapes, shapes_families  # noqa: E402
from tools.make_tiny_pipeline import find_clip_vocab, write_clip_tokenizer_files  # noqa: E402

RESOLUTION = shapes_families.RESOLUTION


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


def sample_captions(labels, index, rng):
    """One caption per example: a template filled with its phrase, or "" 10% of the time (classifier-free guidance)."""
    captions = []
    for i in index:
        if rng.uniform() < 0.1:
            captions.append("")
        else:
            template = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))]
            captions.append(template.format(shapes.caption_phrase(*labels[i], rng)))
    return captions


def train_diffusion(world, latent_mean, latent_std, labels, args, log, snapshot=None):
    """Joint denoiser + text encoder(s) training; returns the mean loss of the last 500 steps and of each block of 200.

    world is an SDWorld or SD3World (the models and their loss). snapshot(step, ema_weights), if given, is called
    every args.snapshot_every steps.
    """
    import torch

    rng = np.random.default_rng([args.seed, 2])
    generator = torch.Generator().manual_seed(args.seed + 2)
    params = world.parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, **world.optimizer_options)
    ema = [p.detach().clone() for p in params]
    world.train(True)
    losses, block_means = [], []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, 200)
        index = rng.integers(0, len(labels), args.batch)
        captions = sample_captions(labels, index, rng)
        idx = torch.from_numpy(index)
        latents = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        loss = world.loss(captions, latents, generator, rng)
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
            snapshot(step + 1, ema)
    with torch.no_grad():
        for shadow, p in zip(ema, params):
            p.copy_(shadow)
    world.train(False)
    return float(np.mean(losses[-500:])), block_means


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
    parser.add_argument("--steps", type=int, default=6000, help="denoiser + text encoder steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--family", choices=sorted(shapes_families.FAMILIES), default="sd",
                        help="sd: UNet + one CLIP encoder, DDPM (tests/assets/shapes-sd); sd3: SD3 transformer + CLIP-L, "
                             "CLIP-G and T5, flow matching (tests/assets/shapes-sd3)")
    parser.add_argument("--text_width", type=int, default=64, help="sd: the CLIP encoder's width")
    parser.add_argument("--layers", type=int, default=6, help="sd3: transformer blocks")
    parser.add_argument("--transformer_width", type=int, default=128, help="sd3: transformer width (16 per head)")
    parser.add_argument("--shift", type=float, default=3.0,
                        help="sd3: the flow scheduler's sigma shift, saved in scheduler/ (SD3/SD3.5's 3.0; 1.0 drew no more "
                             "stars and followed prompts less on this world in a 1200-step comparison)")
    parser.add_argument("--encoder_dropout", type=float, default=0.3,
                        help="sd3: probability that the CLIP pair, and independently T5, see an empty caption")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these tiny kernels, especially on a busy machine)")
    parser.add_argument("--snapshot_every", type=int, default=0,
                        help="also save the EMA weights every N steps to SNAPSHOT_DIR/step-N (to see what longer training buys)")
    parser.add_argument("--snapshot_dir", default=None)
    parser.add_argument("--measure_only", action="store_true",
                        help="only measure the pipeline already in OUT_DIR (e.g. a snapshot) into its pretraining.json")
    args = parser.parse_args(argv)
    if args.snapshot_every and not args.snapshot_dir:
        parser.error("--snapshot_every needs --snapshot_dir")

    import torch

    if args.measure_only:
        torch.set_num_threads(args.threads)
        with open(os.path.join(args.out_dir, "pretraining.json")) as f:
            report = json.load(f)
        write_measurements(args.out_dir, report, print)
        return

    torch.set_num_threads(args.threads)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_clip_tokenizer_files(tokenizer_dir, find_clip_vocab())
        torch.manual_seed(args.seed)
        world = shapes_families.FAMILIES[args.family](args, tokenizer_dir)
        images, labels = make_images(args.images, args.seed)
        log(f"{len(images)} images; params: {world.parameter_counts()}")

        vae = world.vae
        vae_loss = train_vae(vae, images, args.vae_steps, 32, 3e-3, args.seed + 1, log)
        vae_seconds = time.time() - started
        with torch.no_grad():
            dists = [vae.encode(torch.from_numpy(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
            mean = torch.cat([d.mean for d in dists])
            std = torch.cat([d.std for d in dists])
            recon = vae.decode(mean[:600]).sample
        shift, scaling = world.set_latent_statistics(mean)
        recon_pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        judge_on_recon = float(np.mean([shapes.judge(im) == lab for im, lab in zip(recon_pixels, labels[:600])]))
        log(f"latent shift {shift:.4f}, scaling factor {scaling:.4f}; judge accuracy on VAE reconstructions "
            f"{judge_on_recon:.3f}")

        command = "python tools/pretrain_shapes_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
        report = {"command": command, "family": args.family, "held_out": [" ".join(c) for c in shapes.HELD_OUT],
                  "dev_concept": " ".join(shapes.DEV_CONCEPT), "measured_concept": " ".join(shapes.MEASURED_CONCEPT),
                  "resolution": RESOLUTION, "threads": args.threads, "images": args.images, "steps": args.steps,
                  "batch": args.batch, "parameters": world.parameter_counts(), "vae_final_loss": round(vae_loss, 5),
                  "judge_accuracy_on_vae_reconstructions": judge_on_recon, "torch": torch.__version__}
        if args.family == "sd3":
            report.update(encoder_dropout=args.encoder_dropout, shift=args.shift, layers=args.layers,
                          transformer_width=args.transformer_width)

        def snapshot(step, ema):
            folder = os.path.join(args.snapshot_dir, f"step-{step}")
            info = dict(report, snapshot_of_step=step, seconds=round(time.time() - started, 1))
            world.save(folder, {"pretraining.json": json.dumps(info, indent=2) + "\n"}, weights=ema)
            log(f"snapshot {folder}")

        diffusion_loss, block_means = train_diffusion(world, (mean - shift) * scaling, std * scaling, labels, args,
                                                      log, snapshot)
        report.update(vae_seconds=round(vae_seconds, 1), total_seconds=round(time.time() - started, 1),
                      diffusion_loss_last_500_steps=round(diffusion_loss, 5),
                      diffusion_loss_per_200_steps=block_means)
        world.save(args.out_dir, {"pretraining.json": json.dumps(report, indent=2) + "\n"})
    # Measured after saving: the numbers describe the fp16 folder users get, not the fp32 weights in memory.
    write_measurements(args.out_dir, report, log)


def write_measurements(folder, report, log):
    """Measure the saved pipeline in folder and write report plus the measurements to its pretraining.json."""
    from textual_inversion_core.atomic import atomic_path

    measure_started = time.time()
    report.update(measure_saved_pipeline(folder, log))
    report["measure_seconds"] = round(time.time() - measure_started, 1)
    with atomic_path(os.path.join(folder, "pretraining.json")) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    log(f"wrote {folder}: {json.dumps(report)}")


if __name__ == "__main__":
    main()
