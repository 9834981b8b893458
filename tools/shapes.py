"""A procedural domain of coloured shapes, its captions, and a hand-written judge for it.

Images are small RGB squares (32 px by default) with one flat-coloured shape on a light grey
background; position, size, background shade and colour are jittered. The judge reads an image back:
colour = nearest palette colour of the strongly coloured pixels, shape = the template (rendered at
the foreground's bounding box) with the highest overlap. Framework-free (numpy + PIL), so the test,
the pretraining tool and the README picture share one definition of the domain.
"""

import contextlib
import math
import os

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
# Pairs never shown to the base model: each one's colour and shape only appear separately.
# DEV_CONCEPT is the one recipes and thresholds are developed on; MEASURED_CONCEPT is only ever
# measured with what was chosen on the first, so its numbers say how well the choices transfer.
DEV_CONCEPT = ("purple", "star")
MEASURED_CONCEPT = ("green", "triangle")
HELD_OUT = (DEV_CONCEPT, MEASURED_CONCEPT)
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
    """A (colour, shape) drawn uniformly from every pair except the held-out ones."""
    while True:
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        if (colour, shape) not in HELD_OUT:
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


def write_concept_images(folder, concept, count=5, seed=99, size=32):
    """count PNG images of concept, a (colour, shape) pair, in folder: a training set for the trainers."""
    import os

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    stem = "-".join(concept)
    for i in range(count):
        Image.fromarray(render(*concept, rng, size)).save(os.path.join(folder, f"{stem}-{i}.png"))
    return str(folder)


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


def is_flow(pipe):
    """An SD3 (flow-matching transformer) pipeline rather than an SD one."""
    return hasattr(pipe, "transformer")


def load_pipeline(path, embedding_path=None, token=None):
    """The pipeline in fp32 (SD: with a deterministic DDIM sampler; SD3: its own flow-matching Euler sampler),
    optionally with a learned token loaded."""
    import json
    import os

    import torch
    from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    with open(os.path.join(path, "model_index.json")) as f:
        flow = json.load(f)["_class_name"] == "StableDiffusion3Pipeline"
    if flow:
        pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.float32)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if embedding_path is not None and flow:
        from textual_inversion_core.pipeline_loading import load_embedding_into_pipeline

        load_embedding_into_pipeline(pipe, embedding_path, token=token)
    elif embedding_path is not None:
        pipe.load_textual_inversion(embedding_path, token=token)
    return pipe


def _ddpm_prediction(pipe, prompt):
    """predict(latents, noise, k, n) -> (prediction, target) at DDPM timesteps drawn in the k-th of n strata."""
    import torch

    total_steps = pipe.scheduler.config.num_train_timesteps
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0]

    def predict(latents, noise, k, n, generator):
        t = torch.randint(k * total_steps // n, (k + 1) * total_steps // n, (len(latents),), generator=generator)
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        return pipe.unet(noisy, t, hidden.expand(len(latents), -1, -1)).sample, noise

    return predict


def _flow_prediction(pipe, prompt):
    """predict(latents, noise, k, n) -> (prediction, target): the velocity at sigmas whose u lies in the k-th of n
    strata of [0, 1], mapped through the scheduler's (shifted) training sigmas, as textual_inversion.py draws them."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from torch_backend.flow_matching import noisy_input, schedule_points

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # untouched by generation
    hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=FLOW_MAX_SEQUENCE_LENGTH)

    def predict(latents, noise, k, n, generator):
        u = (k + torch.rand((len(latents),), generator=generator)) / n
        timesteps, sigmas = schedule_points(scheduler, u)
        pred = pipe.transformer(hidden_states=noisy_input(latents, noise, sigmas), timestep=timesteps,
                                encoder_hidden_states=hidden.expand(len(latents), -1, -1),
                                pooled_projections=pooled.expand(len(latents), -1), return_dict=False)[0]
        return pred, noise - latents

    return predict


def concept_loss(pipe, prompt, concept, count=48, timesteps_per_image=8, seed=2024):
    """Mean denoising loss of `prompt` on `count` fresh images of concept, a (colour, shape) pair (SD: the epsilon
    MSE; SD3: the unweighted velocity MSE).

    Images, posterior samples, noise and timesteps are fixed by seed, so two prompts are compared
    on exactly the same draws (a paired comparison: the difference is far more stable than either
    loss). Timesteps are stratified over the whole schedule.
    """
    import torch

    rng = np.random.default_rng([seed, 7])
    pixels = np.stack([render(*concept, rng, pipe.vae.config.sample_size) for _ in range(count)])
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(seed)
    shift, scale = pipe.vae.config.get("shift_factor") or 0.0, pipe.vae.config.scaling_factor
    losses = []
    with torch.no_grad():
        predict = (_flow_prediction if is_flow(pipe) else _ddpm_prediction)(pipe, prompt)
        dist = pipe.vae.encode(x).latent_dist
        for k in range(timesteps_per_image):
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator) - shift) * scale
            noise = torch.randn(latents.shape, generator=generator)
            pred, target = predict(latents, noise, k, timesteps_per_image, generator)
            losses.append(((pred - target) ** 2).mean().item())
    return float(np.mean(losses))


def generate(pipe, prompt, count=32, seed=0, steps=20, guidance=4.0):
    """count uint8 HxWx3 images for prompt (fixed seed, the pipeline's sampler, classifier-free guidance)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    flow = is_flow(pipe)
    size = (pipe.transformer if flow else pipe.unet).config.sample_size * pipe.vae_scale_factor
    extra = {"max_sequence_length": FLOW_MAX_SEQUENCE_LENGTH} if flow else {}
    with torch.no_grad():
        out = pipe([prompt] * count, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   height=size, width=size, output_type="np", **extra)
    return [np.clip(im * 255 + 0.5, 0, 255).astype(np.uint8) for im in out.images]


def concept_rate(images, concept):
    """Fraction of images the judge reads as concept, a (colour, shape) pair."""
    return float(np.mean([judge(im) == tuple(concept) for im in images]))


def prompt_following(pipe, count=16, seed=0):
    """How well the base model's words reach each pair: {"red circle": judged rate of "a photo of a red circle"}.

    Every pair, the held-out ones included (their words are known, the pair was never shown), plus
    "a photo of a shape" judged as each held-out pair: the rate the initializer starts from.
    """
    rates = {}
    for colour in COLOURS:
        for shape in SHAPES:
            images = generate(pipe, f"a photo of a {colour} {shape}", count=count, seed=seed)
            rates[f"{colour} {shape}"] = concept_rate(images, (colour, shape))
    generic = generate(pipe, f"a photo of a {GENERIC_WORD}", count=count, seed=seed)
    for concept in HELD_OUT:
        rates[f"{GENERIC_WORD} as {' '.join(concept)}"] = concept_rate(generic, concept)
    return rates


# Tokens per prompt of the flow (SD3) shapes model, CLIP and T5 alike: its captions are a dozen tokens at most, and
# 16 rather than 77 makes pretraining ~4x cheaper. Its CLIP tokenizers are saved with this model_max_length (which
# textual_inversion.py reads); T5's is the trainer's --max_sequence_length (FLOW_RECIPE) and the pipeline's argument.
FLOW_MAX_SEQUENCE_LENGTH = 16

# The textual-inversion recipe this project documents for the shapes model (trainer flags without
# dashes; tests, bench and demo use it). 32 px is the model's resolution; warm-up 0 because runs are
# a few hundred steps long; learning rate and batch from the learning curves of DEV_CONCEPT.
RECIPE = {"initializer_token": GENERIC_WORD, "resolution": 32, "train_batch_size": 8, "learning_rate": 5e-3,
          "lr_scheduler": "constant", "lr_warmup_steps": 0}
# A token is "learned" when all three hold. Set from the development concept after 200 steps of the recipe
# (README "Proof that it learns"): over 8 runs (PyTorch seeds 1, 2, 3, 1234; Flax seeds 1, 2, 3, 1234) the
# loss margin was >= 0.00143 and the judged rate >= 0.41, the initializer's 0; the negative control's margin
# is ~1e-12 and its rate 0. The thresholds sit near half of the weakest run.
MIN_LOSS_MARGIN = 0.0008  # initializer's concept loss minus the token's
MIN_CONCEPT_RATE = 0.25  # judged rate of the token's samples
MIN_RATE_GAIN = 0.2  # token's judged rate minus the initializer's
LEARNED = {"loss_margin": MIN_LOSS_MARGIN, "rate": MIN_CONCEPT_RATE, "rate_gain": MIN_RATE_GAIN}
GENERATED = 48  # samples per prompt behind every judged rate
# How `make demo`, tests/test_learning.py and bench/step_scoring.py score the saved steps of a run: the validation
# loss on VALIDATION_IMAGES other fresh images of the concept (--validation_data_dir; the training images are
# write_concept_images' default seed 99), the paper's scores with the shapes CLIP at 8 pictures per prompt and 20
# sampler steps: more than the flags' defaults (4, 25), since one reconstruction prompt of 4 pictures ranks steps
# noisily.
VALIDATION_IMAGES = 5
VALIDATION_IMAGE_SEED = 7
SCORING_CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets",
                            "shapes-clip")
SCORING_FLAGS = {"eval_clip_model": SCORING_CLIP, "eval_num_samples": 8, "eval_inference_steps": 20}

# The recipe on the flow (SD3) shapes model, tests/assets/shapes-sd3: the same, with T5 read at the model's length.
FLOW_RECIPE = dict(RECIPE, max_sequence_length=FLOW_MAX_SEQUENCE_LENGTH)
# A token is "learned" on the flow model when all three hold (tests/test_flow_learning.py), per (held-out pair,
# setting): "sd3" the token in the CLIP encoders (the trainer's default), "sd3+t5" in T5 too (--enable_t5_ti). Set from
# 200 steps of FLOW_RECIPE on tests/assets/shapes-sd3, seeds 1, 2, 3 (bench/learning_results.json, step 200):
#   purple star     sd3     margins 0.0873 0.0884 0.0878, rates 30/48 28/48 30/48 (initializer: velocity loss 0.708, 0/48)
#                   sd3+t5  margins 0.0876 0.0885 0.0881, rates 31/48 31/48 29/48
#   green triangle  sd3     margins 0.1485 0.1495 0.1473, rates 48/48 each (initializer: 0.827, 0/48)
#                   sd3+t5  margins 0.1511 0.1493 0.1493, rates 48/48 each
# Each threshold is about half of the weakest seed's number, as for the SD model (LEARNED).
_FLOW_PURPLE_STAR = {"loss_margin": 0.044, "rate": 0.3, "rate_gain": 0.3}
_FLOW_GREEN_TRIANGLE = {"loss_margin": 0.074, "rate": 0.5, "rate_gain": 0.5}
FLOW_LEARNED = {("purple star", "sd3"): _FLOW_PURPLE_STAR, ("purple star", "sd3+t5"): _FLOW_PURPLE_STAR,
                ("green triangle", "sd3"): _FLOW_GREEN_TRIANGLE, ("green triangle", "sd3+t5"): _FLOW_GREEN_TRIANGLE}


def learning_shortfalls(numbers, thresholds=LEARNED):
    """The learned-token claims that `numbers` (from measure_embeddings) fail, as sentences; [] if none.
    thresholds: LEARNED (the SD shapes model) or an entry of FLOW_LEARNED (the SD3 one)."""
    failures = []
    margin = numbers["loss_initializer"] - numbers["loss_token"]
    if margin < thresholds["loss_margin"]:
        failures.append(f"token loss only {margin:.5f} below the initializer's (need {thresholds['loss_margin']})")
    if numbers["rate_token"] < thresholds["rate"]:
        failures.append(f"only {numbers['rate_token']:.2f} of token samples judged the concept "
                        f"(need {thresholds['rate']})")
    gain = numbers["rate_token"] - numbers["rate_initializer"]
    if gain < thresholds["rate_gain"]:
        failures.append(f"token samples judged the concept only {gain:.2f} more often than the initializer's "
                        f"(need {thresholds['rate_gain']})")
    return failures


def judged_samples(pipe, prompt, count=GENERATED):
    """The samples behind a judged rate (fixed seed): the same pictures for measure_prompt and judged_rates."""
    return generate(pipe, prompt, count=count, seed=1)


def measure_prompt(pipe, prompt, concept, count=GENERATED, keep_images=False):
    """Concept loss and judged rate of one prompt (the paired draws of concept_loss and generate)."""
    images = judged_samples(pipe, prompt, count)
    numbers = {"loss": concept_loss(pipe, prompt, concept), "rate": concept_rate(images, concept)}
    return (numbers, images) if keep_images else numbers


@contextlib.contextmanager
def token_loaded(pipe, path, token):
    """(pipeline, text to write for the token) with the embedding file at path loaded, as a user loads it: SD by
    diffusers' load_textual_inversion (unloaded again afterwards); SD3, which has no unloader, into a copy by
    textual_inversion_core's load_embedding_into_pipeline (every trained encoder's file of the set)."""
    if is_flow(pipe):
        import copy

        from textual_inversion_core.pipeline_loading import load_embedding_into_pipeline

        loaded = copy.deepcopy(pipe)
        yield loaded, load_embedding_into_pipeline(loaded, path, token=token)
        return
    pipe.load_textual_inversion(path, token=token)
    try:
        yield pipe, pipe.maybe_convert_prompt(token, pipe.tokenizer)  # multi-vector tokens
    finally:
        pipe.unload_textual_inversion()


def measure_embeddings(pipeline, files, token, concept, initializer=GENERIC_WORD, count=GENERATED, keep_images=False):
    """{file: {"loss_token", "rate_token", "loss_initializer", "rate_initializer"}} for learned-embedding files.

    Each file is loaded as a user would (token_loaded); the initializer prompt is measured once, on the same draws.
    With keep_images, each entry also has "images" (the token's samples) and the result an
    "initializer" entry with the initializer's.
    """
    pipe = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    base, base_images = measure_prompt(pipe, f"a photo of a {initializer}", concept, count, keep_images=True)
    results = {}
    for path in files:
        with token_loaded(pipe, path, token) as (loaded, trigger):
            numbers, images = measure_prompt(loaded, f"a photo of a {trigger}", concept, count, keep_images=True)
        results[path] = {"loss_token": numbers["loss"], "rate_token": numbers["rate"],
                         "loss_initializer": base["loss"], "rate_initializer": base["rate"]}
        if keep_images:
            results[path]["images"] = images
    if keep_images:
        results["initializer"] = {"images": base_images, **base}
    return results


def judged_rates(pipeline, files, token, concept, count=GENERATED):
    """{file: judged rate of "a photo of a <token>"} of learned-embedding files, loaded as measure_embeddings loads
    them; the rate alone (no concept loss, no initializer), the same samples as measure_embeddings'."""
    pipe = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    rates = {}
    for path in files:
        with token_loaded(pipe, path, token) as (loaded, trigger):
            rates[path] = concept_rate(judged_samples(loaded, f"a photo of a {trigger}", count), concept)
    return rates


def parse_concept(text):
    """'purple star' or 'purple-star' -> ('purple', 'star'), checked against the domain."""
    colour, shape = text.replace("-", " ").split()
    if colour not in PALETTE or shape not in SHAPES:
        raise ValueError(f"unknown concept {text!r}: colours {COLOURS}, shapes {SHAPES}")
    return colour, shape


def main(argv=None):
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Judge accuracy, or measure learned tokens on the shapes model.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("judge", help="judge accuracy on fresh procedural images")
    meas = sub.add_parser("measure", help="concept loss and judged rate of learned-embedding files (one JSON line)")
    meas.add_argument("--pipeline", required=True)
    meas.add_argument("--token", required=True)
    meas.add_argument("--concept", required=True, type=parse_concept, help="e.g. 'purple star'")
    meas.add_argument("--threads", type=int, default=1)
    meas.add_argument("files", nargs="+", help="learned_embeds*.safetensors / .bin files")
    args = parser.parse_args(argv)
    if args.command == "judge":
        print(f"judge accuracy on 600 fresh images: {judge_accuracy():.3f}")
        return
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure_embeddings(args.pipeline, args.files, args.token, args.concept)))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
