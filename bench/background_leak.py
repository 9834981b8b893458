#!/usr/bin/env python
"""Does the background of the training pictures leak into the learned token? Captions and masks vs templates.

    OMP_NUM_THREADS=1 .venv/bin/python bench/background_leak.py [--seeds 1234 1 7] [--out bench/background_leak.json]

On the pretrained shapes model (tests/assets/shapes-sd, which only ever saw light grey backgrounds) the
concept is the held-out purple star, photographed on an orange background: 5 training pictures. The
PyTorch trainer learns <my-shape> (initializer "shape", resolution 32, batch 8, 300 steps, lr 5e-3, as
tests/test_learning.py) three ways:

  templates  the built-in object templates only ("a photo of a <my-shape>")
  captions   each picture captioned "orange background" (--caption_extension .txt): "a photo of a
             <my-shape>, orange background"
  mask       templates, and --masked_loss with a mask per picture (the star's coverage) in --mask_dir

Each token is then measured with the prompt "a photo of a <my-shape>" against the initializer's "a photo of
a shape", on the same fresh pictures, noise and timesteps (paired, so the differences are exact):

  background_gain  how much lower the token's denoising loss is than the initializer's on the background
                   latent pixels of fresh stars on orange: how much of the orange background the token holds
  star_gain        the same on the star's own latent pixels: how much of the concept it holds
  star_gain_grey   star_gain on fresh stars on the model's usual grey background

and on 48 pictures generated from it (same seeds for every token):

  orange_border    the generated background's orange: mean over pictures of the border's median (R - B),
                   in units of the training orange's (0: grey, 1: the training orange; purple is negative)
  purple_star      the fraction of pictures the hand-written judge (tools/shapes.judge) reads as a purple star

Trained embeddings stay in bench/pipelines/background_leak/ (git-ignored) and are reused unless --retrain.
Numbers go to the JSON file and are printed as a Markdown table (README "Masked loss" quotes them).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tools import shapes  # noqa: E402

ASSET = os.path.join(ROOT, "tests", "assets", "shapes-sd")
TOKEN, INITIALIZER = "<my-shape>", "shape"
CONCEPT = ("purple", "star")
BACKGROUND_WORD = "orange"
BACKGROUND = np.asarray(shapes.PALETTE[BACKGROUND_WORD], np.float32)
GREY = np.float32([232, 232, 232])  # the middle of the pretraining backgrounds' shades (215-250)
TRAIN = ["--resolution=32", "--train_batch_size=8", "--max_train_steps=300", "--learning_rate=5e-3",
         "--lr_warmup_steps=0", "--report_to=none", "--checkpointing_steps=0", "--save_steps=0",
         "--export_formats=diffusers"]
GENERATED = 48


def render_on(background, rng, size=32):
    """(uint8 picture, float coverage) of a purple star, jittered as tools/shapes.render, on a flat background."""
    side = rng.uniform(0.42, 0.72) * size
    x0, y0 = rng.uniform(1, size - 1 - side), rng.uniform(1, size - 1 - side)
    coverage = shapes.shape_coverage(CONCEPT[1], (x0, y0, x0 + side, y0 + side), size)
    fill = np.clip(np.asarray(shapes.PALETTE[CONCEPT[0]], np.float32) + rng.normal(0, 8, 3), 0, 255)
    shade = np.clip(np.asarray(background, np.float32) + rng.normal(0, 6, 3), 0, 255)
    image = coverage[..., None] * fill + (1 - coverage[..., None]) * shade
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), coverage


def write_training_set(folder, count=5, seed=99):
    from PIL import Image

    images, masks = os.path.join(folder, "images"), os.path.join(folder, "masks")
    os.makedirs(images)
    os.makedirs(masks)
    rng = np.random.default_rng(seed)
    for i in range(count):
        picture, coverage = render_on(BACKGROUND, rng)
        Image.fromarray(picture).save(os.path.join(images, f"star_{i}.png"))
        Image.fromarray(np.clip(coverage * 255 + 0.5, 0, 255).astype(np.uint8)).save(os.path.join(masks, f"star_{i}.png"))
        with open(os.path.join(images, f"star_{i}.txt"), "w", encoding="utf-8") as f:
            f.write(f"{BACKGROUND_WORD} background")
    return images, masks


def train(images, masks, out, method, seed):
    flags = {"templates": [], "captions": ["--caption_extension=.txt"],
             "mask": ["--masked_loss", f"--mask_dir={masks}"]}[method]
    command = [sys.executable, os.path.join(ROOT, "textual_inversion.py"), f"--pretrained_model_name_or_path={ASSET}",
               f"--train_data_dir={images}", f"--output_dir={out}", f"--placeholder_token={TOKEN}",
               f"--initializer_token={INITIALIZER}", f"--seed={seed}"] + TRAIN + flags
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({method}, seed {seed}):\n{result.stderr[-3000:]}")


def region_losses(pipe, prompts, background, count=48, timesteps_per_image=8, seed=2024):
    """{prompt: (background loss, star loss)}: the denoising loss of each prompt on count fresh stars on
    background, averaged over the background's and the star's latent pixels (weights: the star's coverage,
    area-averaged to latent resolution). Stars, posterior samples, noise and timesteps are the same for every
    prompt (fixed by seed): a paired comparison."""
    import torch

    rng = np.random.default_rng([seed, 3])
    drawn = [render_on(background, rng) for _ in range(count)]
    x = torch.from_numpy(np.stack([p for p, _ in drawn]).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    coverage = torch.from_numpy(np.stack([c for _, c in drawn]).astype(np.float32))[:, None]
    total = pipe.scheduler.config.num_train_timesteps
    results = {}
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
        star = torch.nn.functional.avg_pool2d(coverage, x.shape[-1] // dist.mean.shape[-1])[:, 0]
        for prompt in prompts:
            ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = pipe.text_encoder(ids)[0].expand(count, -1, -1)
            generator = torch.Generator().manual_seed(seed)
            sums = np.zeros(2)
            for k in range(timesteps_per_image):
                scale = pipe.vae.config.scaling_factor
                latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)) * scale
                noise = torch.randn(latents.shape, generator=generator)
                t = torch.randint(k * total // timesteps_per_image, (k + 1) * total // timesteps_per_image, (count,),
                                  generator=generator)
                pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, hidden).sample
                error = ((pred - noise) ** 2).mean(dim=1)
                sums += [float((error * (1 - star)).sum() / (1 - star).sum()), float((error * star).sum() / star.sum())]
            results[prompt] = tuple(sums / timesteps_per_image)
    return results


def orange_border(image):
    """The generated background's orange: the border's median (R - B), in units of the training orange's."""
    pixels = np.asarray(image, np.float32)
    border = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    return float((border[0] - border[2]) / (BACKGROUND[0] - BACKGROUND[2]))


def measure(pipe, prompt, reference):
    on_orange = region_losses(pipe, [prompt, reference], BACKGROUND)
    on_grey = region_losses(pipe, [prompt, reference], GREY)
    images = shapes.generate(pipe, prompt, count=GENERATED, seed=1)
    return {"background_gain": on_orange[reference][0] - on_orange[prompt][0],
            "star_gain": on_orange[reference][1] - on_orange[prompt][1],
            "star_gain_grey": on_grey[reference][1] - on_grey[prompt][1],
            "orange_border": float(np.mean([orange_border(im) for im in images])),
            "purple_star": float(np.mean([shapes.judge(im) == CONCEPT for im in images]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 7])
    parser.add_argument("--methods", nargs="+", default=["templates", "captions", "mask"])
    parser.add_argument("--out", default=os.path.join(HERE, "background_leak.json"))
    parser.add_argument("--work", default=os.path.join(HERE, "pipelines", "background_leak"))
    parser.add_argument("--retrain", action="store_true", help="train again even where an embedding is stored")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = {"concept": " ".join(CONCEPT), "background": BACKGROUND_WORD, "generated": GENERATED,
               "train_flags": TRAIN, "runs": []}
    data = os.path.join(args.work, "data")
    if args.retrain and os.path.isdir(args.work):
        shutil.rmtree(args.work)
    if not os.path.isdir(data):
        write_training_set(data)
    images, masks = os.path.join(data, "images"), os.path.join(data, "masks")
    reference = f"a photo of a {INITIALIZER}"
    base = shapes.load_pipeline(ASSET)
    results["initializer"] = {"orange_border": float(np.mean([orange_border(im) for im in
                                                               shapes.generate(base, reference, count=GENERATED, seed=1)])),
                              "purple_star": 0.0}
    print("initializer", results["initializer"], flush=True)
    for seed in args.seeds:
        for method in args.methods:
            out = os.path.join(args.work, f"{method}-{seed}")
            started = time.time()
            if not os.path.isfile(os.path.join(out, "learned_embeds.safetensors")):
                train(images, masks, out, method, seed)
            pipe = shapes.load_pipeline(ASSET, out, TOKEN)
            numbers = measure(pipe, f"a photo of a {TOKEN}", reference)
            numbers.update(method=method, seed=seed, seconds=round(time.time() - started, 1))
            results["runs"].append(numbers)
            print(numbers, flush=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(table(results))


COLUMNS = (("background_gain", "{:+.4f}"), ("star_gain", "{:+.4f}"), ("star_gain_grey", "{:+.4f}"),
           ("orange_border", "{:.3f}"), ("purple_star", "{:.2f}"))


def table(results):
    rows = ["| training | background gain (orange) | star gain (orange) | star gain (grey) | orange of generated "
            "backgrounds | judged purple star |", "|---|---:|---:|---:|---:|---:|"]
    first = results["initializer"]
    rows.append(f"| none (initializer \"{INITIALIZER}\") | 0 | 0 | 0 | {first['orange_border']:.3f} | "
                f"{first['purple_star']:.2f} |")
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["method"] == method]
        cells = []
        for key, fmt in COLUMNS:
            values = [r[key] for r in runs]
            cells.append(f"{fmt.format(np.mean(values))} ({', '.join(fmt.format(v) for v in values)})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
