"""A procedural domain of coloured shapes, its captions, and a hand-written judge for it.

Images are small RGB squares (32 px by default) with one flat-coloured shape on a light grey
background; position, size, background shade and colour are jittered. The judge reads an image back:
colour = nearest palette colour of the strongly coloured pixels, shape = the template (rendered at
the foreground's bounding box) with the highest overlap. Framework-free (numpy + PIL), so the test,
the pretraining tool and the README picture share one definition of the domain.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

# Flat RGB colours, far apart in hue, each a single CLIP token.
PALETTE = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (230, 210, 25),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = tuple(PALETTE)
# The pair never shown to the base model: its colour and its shape only appear separately.
HELD_OUT = ("purple", "star")
# Word used for "some shape" in pretraining captions; also the textual-inversion initializer.
GENERIC_WORD = "shape"

SUPERSAMPLE = 4


def _star_points(inner=0.45):
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _normalise(points):
    """Stretch a polygon so its bounding box is exactly [-1, 1]^2 (so bbox-fitted templates match)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [(2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in points]


_ARM = 0.36  # half width of the cross arms, in units of the half size
POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _normalise(_star_points()),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
}


def shape_coverage(shape, box, size):
    """Anti-aliased coverage in [0, 1], [size, size], of `shape` filling box (x0, y0, x1, y1) in pixels."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in box)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        draw.polygon([(cx + px * hx, cy + py * hy) for px, py in POLYGONS[shape]], fill=255)
    small = canvas.resize((size, size), resample=Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(colour, shape, rng, size=32):
    """One uint8 [size, size, 3] image of `colour` `shape`, with jitter drawn from rng (np.random.Generator)."""
    side = rng.uniform(0.42, 0.72) * size
    x0 = rng.uniform(1, size - 1 - side)
    y0 = rng.uniform(1, size - 1 - side)
    coverage = shape_coverage(shape, (x0, y0, x0 + side, y0 + side), size)[..., None]
    background = np.full(3, rng.uniform(215, 250), dtype=np.float32)
    fill = np.clip(np.asarray(PALETTE[colour], dtype=np.float32) + rng.normal(0, 8, 3), 0, 255)
    image = coverage * fill + (1 - coverage) * background
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def caption_text(colour, shape):
    """The concept phrase of a caption: 'red circle', 'red shape', 'circle' or 'shape'."""
    return " ".join(w for w in (colour, shape) if w)


def sample_pair(rng):
    """A (colour, shape) drawn uniformly from every pair except the held-out one."""
    while True:
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        if (colour, shape) != HELD_OUT:
            return colour, shape


def caption_phrase(colour, shape, rng, generic_rate=0.25):
    """The phrase a pretraining caption uses for an image: usually 'red circle', sometimes vaguer.

    With probability generic_rate the colour is dropped and/or the shape is named by the generic
    word, so that to the base model "a photo of a shape" means "any shape of any colour".
    """
    if rng.uniform() < generic_rate:
        kind = rng.integers(3)
        if kind == 0:
            return caption_text(None, shape)
        if kind == 1:
            return caption_text(colour, GENERIC_WORD)
        return GENERIC_WORD
    return caption_text(colour, shape)


# --------------------------------------------------------------------------------------------------
# Judge


def _foreground(pixels):
    """(coverage estimate in [0, 1], background colour): distance from the median border colour."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(pixels - background).max(axis=-1)
    return distance, background


def _largest_component(mask):
    """The largest 4-connected region of a boolean mask (generated images have stray blotches)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


def judge(image):
    """(colour, shape) of one image (PIL or uint8/float array, HxWx3). Shape is None if nothing is drawn."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    size = pixels.shape[0]
    distance, _ = _foreground(pixels)
    # Half of the strongest contrast: keeps the shape, drops the faint haze generated images have.
    threshold = max(40.0, 0.5 * float(np.percentile(distance, 99)))
    mask = _largest_component(distance > threshold)
    if mask.sum() < 4:
        return None, None
    # Colour: the most strongly coloured half of the shape, nearest palette entry.
    strong = pixels[mask][np.argsort(-distance[mask])[: max(1, int(mask.sum()) // 2)]]
    centre = np.median(strong, axis=0)
    colour = min(PALETTE, key=lambda name: float(((np.asarray(PALETTE[name]) - centre) ** 2).sum()))
    # Shape: fit each template to the shape's bounding box; the best overlap (IoU) wins.
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    if box[2] - box[0] < 3 or box[3] - box[1] < 3:
        return colour, None

    def overlap(shape):
        template = shape_coverage(shape, box, size) > 0.5
        return float((template & mask).sum() / max((template | mask).sum(), 1))

    return colour, max(SHAPES, key=overlap)


def judge_accuracy(count=600, seed=12345, size=32, transform=None):
    """Fraction of fresh procedural images (all pairs, held-out included) the judge reads correctly."""
    rng = np.random.default_rng(seed)
    correct = 0
    for i in range(count):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = render(colour, shape, rng, size)
        if transform is not None:
            image = transform(image)
        correct += judge(image) == (colour, shape)
    return correct / count


def grid(rows, scale=4, pad=2, background=255):
    """Tile a list of rows of uint8 HxWx3 images into one PIL image (nearest-neighbour upscaled)."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((len(rows) * cell_h + pad, columns * cell_w + pad, 3), background, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            big = np.asarray(image, dtype=np.uint8).repeat(scale, 0).repeat(scale, 1)
            top, left = pad + r * cell_h, pad + c * cell_w
            canvas[top : top + height * scale, left : left + width * scale] = big
    return Image.fromarray(canvas)


# --------------------------------------------------------------------------------------------------
# Measurements on a pipeline (torch and diffusers are imported only here)


def load_pipeline(path, embedding_path=None, token=None):
    """The pipeline in fp32 with a deterministic DDIM sampler; optionally with a learned token loaded."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if embedding_path is not None:
        pipe.load_textual_inversion(embedding_path, token=token)
    return pipe


def concept_loss(pipe, prompt, colour=HELD_OUT[0], shape=HELD_OUT[1], count=48, timesteps_per_image=8, seed=2024):
    """Mean denoising loss of `prompt` on `count` fresh images of the concept.

    Images, posterior samples, noise and timesteps are fixed by seed, so two prompts are compared
    on exactly the same draws (a paired comparison: the difference is far more stable than either
    loss). Timesteps are stratified over the whole schedule.
    """
    import torch

    rng = np.random.default_rng([seed, 7])
    pixels = np.stack([render(colour, shape, rng, pipe.vae.config.sample_size) for _ in range(count)])
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(seed)
    total_steps = pipe.scheduler.config.num_train_timesteps
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        dist = pipe.vae.encode(x).latent_dist
        for k in range(timesteps_per_image):
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)) * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            low, high = k * total_steps // timesteps_per_image, (k + 1) * total_steps // timesteps_per_image
            t = torch.randint(low, high, (count,), generator=generator)
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            pred = pipe.unet(noisy, t, hidden.expand(count, -1, -1)).sample
            losses.append(((pred - noise) ** 2).mean().item())
    return float(np.mean(losses))


def generate(pipe, prompt, count=32, seed=0, steps=20, guidance=4.0):
    """count uint8 HxWx3 images for prompt (fixed seed, DDIM, classifier-free guidance)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe([prompt] * count, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   height=size, width=size, output_type="np")
    return [np.clip(im * 255 + 0.5, 0, 255).astype(np.uint8) for im in out.images]


def concept_rate(images, colour=HELD_OUT[0], shape=HELD_OUT[1]):
    """Fraction of images the judge reads as (colour, shape)."""
    return float(np.mean([judge(im) == (colour, shape) for im in images]))


def picture(pipeline, embedding_dir, token, out, count=8, seed=1):
    """README grid: training images, then rows generated from the words, the initializer and the token."""
    from textual_inversion_core.atomic import atomic_path

    pipe = load_pipeline(pipeline, embedding_dir, token)
    rng = np.random.default_rng(99)
    rows = [[render(*HELD_OUT, rng) for _ in range(5)]]
    for prompt in (f"a photo of a {' '.join(HELD_OUT)}", f"a photo of a {GENERIC_WORD}", f"a photo of a {token}"):
        images = generate(pipe, prompt, count=count, seed=seed)
        print(f"{prompt!r}: judged {' '.join(HELD_OUT)} {concept_rate(images):.2f}")
        rows.append(images)
    with atomic_path(out) as tmp:
        grid(rows).save(tmp, format="PNG")


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Judge accuracy, or the README picture for a learned token.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("judge", help="judge accuracy on fresh procedural images")
    pic = sub.add_parser("picture", help="grid: training images, words, initializer, learned token")
    pic.add_argument("--pipeline", required=True)
    pic.add_argument("--embedding_dir", required=True, help="the trainer's output_dir")
    pic.add_argument("--token", required=True)
    pic.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "judge":
        print(f"judge accuracy on 600 fresh images: {judge_accuracy():.3f}")
    else:
        picture(args.pipeline, args.embedding_dir, args.token, args.out)


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
