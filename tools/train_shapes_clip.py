#!/usr/bin/env python
"""Train a tiny CLIP on the shapes world, on CPU, from scratch: the offline stand-in for openai/clip-vit-*.

    OMP_NUM_THREADS=1 .venv/bin/python tools/train_shapes_clip.py tests/assets/shapes-clip --seed 0

Images come from the shapes world's own generator (tools/shapes.py: one jittered flat-coloured shape on
light grey, 32 px) and captions from its vocabulary, in varied wording: the textual-inversion object
templates ("a photo of a {}", "a rendering of a {}", ...), now and then the background named ("... on grey",
"... on a light grey background"), and sometimes a vaguer phrase ("a red shape", "a star", "a shape") as
the diffusion model's pretraining captions have. The held-out pairs (shapes.HELD_OUT: purple star, green
triangle) are never drawn and never captioned, so scores measured on them are not inflated.

The loss is CLIP's symmetric contrastive loss, with one change: a batch of 28 classes has many captions
that fit an image (two red circles, or "a red shape" and a red star), so each row's target spreads evenly
over every caption (image) that fits instead of only the one it was drawn with.

Writes a transformers CLIPModel folder (config.json, model.safetensors in fp16, preprocessor_config.json
for CLIPImageProcessor, vocab.json + merges.txt of the real CLIP BPE vocabulary read from the clip-anytorch
wheel, tokenizer_config.json, special_tokens_map.json) that `CLIPModel.from_pretrained` and
`CLIPProcessor.from_pretrained` load in transformers 4.x and 5.x, plus training.json: the command, seed,
time, CPU, losses, and zero-shot accuracies measured on the saved (fp16) model with fresh images.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from textual_inversion_core.data import OBJECT_TEMPLATES  # noqa: E402
from tools import shapes  # noqa: E402
from tools.make_tiny_pipeline import find_clip_vocab, write_clip_tokenizer_files  # noqa: E402

RESOLUTION = 32
# OpenAI CLIP's normalisation, which CLIPImageProcessor uses by default: users who swap in a real CLIP
# preprocess the same way.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND_WORDS = ("on grey", "on a grey background", "on a light grey background", "on a plain grey background")
# The prompts zero-shot classification uses (what eval's prompts look like: "a photo of a ...").
ZERO_SHOT_TEMPLATE = "a photo of a {}"


def model_config(width=64, vision_width=64, layers=3, projection=64):
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=projection)
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_attention_heads=4,
                  num_hidden_layers=layers, image_size=RESOLUTION, patch_size=4, num_channels=3,
                  projection_dim=projection)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def pixel_values(images):
    """uint8 [N, H, W, 3] -> float32 NCHW normalised as CLIPImageProcessor does (at the model's own size)."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def make_images(count, rng, pairs=None):
    """count images and their (colour, shape) labels; pairs: a list to cycle through, else every seen pair at random."""
    labels = [pairs[i % len(pairs)] if pairs else shapes.sample_pair(rng) for i in range(count)]
    return np.stack([shapes.render(c, s, rng, RESOLUTION) for c, s in labels]), labels


def caption(colour, shape, rng, generic_rate=0.2, background_rate=0.3):
    """(text, colour or None, shape or None): a varied caption of a seen pair and what it claims."""
    named_colour, named_shape = colour, shape
    if rng.uniform() < generic_rate:
        kind = rng.integers(3)
        named_colour = colour if kind == 1 else None
        named_shape = shape if kind == 0 else None
    phrase = shapes.caption_text(named_colour, named_shape or shapes.GENERIC_WORD)
    text = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))].format(phrase)
    if rng.uniform() < background_rate:
        text += " " + BACKGROUND_WORDS[rng.integers(len(BACKGROUND_WORDS))]
    return text, named_colour, named_shape


def fits(claims, labels):
    """[captions, images] bool: caption i's named colour and shape (None: any) both fit image j."""
    colours = np.array([c for c, _ in labels])
    kinds = np.array([s for _, s in labels])
    out = np.ones((len(claims), len(labels)), dtype=bool)
    for i, (colour, shape) in enumerate(claims):
        if colour is not None:
            out[i] &= colours == colour
        if shape is not None:
            out[i] &= kinds == shape
    return out


def cosine_lr(step, total, peak, warmup):
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, tokenizer, images, labels, args, log):
    """Contrastive training; returns the mean loss of each block of args.log_every steps."""
    import torch

    rng = np.random.default_rng([args.seed, 2])
    pixels = torch.from_numpy(pixel_values(images))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    losses, block_means = [], []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, 100)
        index = rng.integers(0, len(labels), args.batch)
        batch_labels = [labels[i] for i in index]
        drawn = [caption(c, s, rng) for c, s in batch_labels]
        ids = tokenizer([t for t, _, _ in drawn], padding=True, return_tensors="pt")
        target = torch.from_numpy(fits([(c, s) for _, c, s in drawn], batch_labels).astype(np.float32))
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels[index])
        logits = out.logits_per_text  # [captions, images]
        loss = 0.5 * (soft_cross_entropy(logits, target) + soft_cross_entropy(logits.t(), target.t()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP's clamp: the temperature may not fall below 1/100
            model.logit_scale.clamp_(0, np.log(100.0))
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            block_means.append(round(float(np.mean(losses[-args.log_every:])), 5))
            log(f"step {step + 1}/{args.steps} loss(avg {args.log_every}) {block_means[-1]:.4f} "
                f"logit scale {model.logit_scale.exp().item():.1f}")
    model.eval()
    return block_means


def soft_cross_entropy(logits, target):
    """Cross-entropy of each row's softmax against its fitting columns, weighted evenly."""
    import torch

    target = target / target.sum(dim=1, keepdim=True)
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def save(model, tokenizer_dir, out_dir, report):
    """fp16 weights, image processor and tokenizer files, training.json; staged, then moved into out_dir."""
    import copy

    from transformers import CLIPImageProcessor, CLIPTokenizer

    from textual_inversion_core.hf_layout import move_into

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-clip-", dir=parent)
    try:
        copy.deepcopy(model).half().save_pretrained(staging, safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION},
                           image_mean=list(MEAN), image_std=list(STD)).save_pretrained(staging)
        CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77).save_pretrained(staging)
        # transformers 5 writes only tokenizer.json, which 4.x cannot read: ship the BPE files both read, and
        # drop tokenizer.json (3.6 MB, rebuilt from them on load) to keep the folder small.
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(staging, name))
        os.unlink(os.path.join(staging, "tokenizer.json"))
        with open(os.path.join(staging, "training.json"), "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        for name in os.listdir(staging):  # safetensors writes 0600; the asset is for everyone to read
            os.chmod(os.path.join(staging, name), 0o644)
        move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Measurements on a saved folder (the test uses these too)


def load(folder):
    """(CLIPModel in fp32, eval mode, CLIPProcessor) of a saved folder; raises if any weight is missing or extra."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, info = CLIPModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"{folder}: weights not loaded as saved: {problems}")
    return model.eval(), CLIPProcessor.from_pretrained(folder)


def embed_images(model, processor, images):
    """L2-normalised image embeddings [N, D] of uint8 HxWx3 images, through the folder's own image processor."""
    import torch

    inputs = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)  # transformers 5 may return an output object
    return torch.nn.functional.normalize(features, dim=-1)


def embed_texts(model, processor, texts):
    import torch

    inputs = processor(text=list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    features = getattr(features, "pooler_output", features)
    return torch.nn.functional.normalize(features, dim=-1)


def zero_shot(model, processor, images, labels):
    """{"colour", "shape", "pair"}: fraction of images whose most similar prompt ("a photo of a red shape" among
    the colours, "a photo of a star" among the shapes, "a photo of a red star" among all 30 pairs) is right."""
    image_features = embed_images(model, processor, images)
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    choices = {"colour": [(c, None) for c in shapes.COLOURS], "shape": [(None, s) for s in shapes.SHAPES],
               "pair": pairs}
    out = {}
    for kind, options in choices.items():
        prompts = [ZERO_SHOT_TEMPLATE.format(shapes.caption_text(c, s or shapes.GENERIC_WORD)) for c, s in options]
        best = (image_features @ embed_texts(model, processor, prompts).T).argmax(dim=1).tolist()
        right = [all(want is None or want == got for want, got in zip(options[b], label))
                 for b, label in zip(best, labels)]
        out[kind] = round(float(np.mean(right)), 4)
    return out


def nearest_centroid(model, processor, per_pair=40, seed=4321):
    """Image-to-image: fraction of fresh images of every pair (held-out ones included) nearer, in cosine, to
    the mean embedding of their own pair's other fresh images than to any other pair's. What a
    reconstruction score needs: images of one concept closer to each other than to neighbouring concepts."""
    import torch

    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    images, labels = make_images(2 * per_pair * len(pairs), rng, pairs)
    features = embed_images(model, processor, images)
    pair_index = torch.tensor([pairs.index(label) for label in labels])
    reference = torch.arange(len(labels)) < per_pair * len(pairs)
    centroids = torch.stack([features[reference & (pair_index == k)].mean(0) for k in range(len(pairs))])
    predicted = (features[~reference] @ centroids.T).argmax(dim=1)
    correct = (predicted == pair_index[~reference]).float()
    held_out = torch.tensor([pairs[k] in shapes.HELD_OUT for k in pair_index[~reference].tolist()])
    return {"all_pairs": round(float(correct.mean()), 4), "held_out_pairs": round(float(correct[held_out].mean()), 4)}


def measure(folder, per_pair=40, seed=1234):
    """Zero-shot accuracies on fresh images of the seen pairs and of each held-out pair, and nearest-centroid."""
    model, processor = load(folder)
    rng = np.random.default_rng(seed)
    seen = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if (c, s) not in shapes.HELD_OUT]
    images, labels = make_images(per_pair * len(seen), rng, seen)
    result = {"fresh_images_per_pair": per_pair, "zero_shot_template": ZERO_SHOT_TEMPLATE,
              "zero_shot_seen_pairs": zero_shot(model, processor, images, labels)}
    for pair in shapes.HELD_OUT:
        images, labels = make_images(per_pair, rng, [pair])
        result[f"zero_shot_{'_'.join(pair)}"] = zero_shot(model, processor, images, labels)
    result["image_nearest_centroid"] = nearest_centroid(model, processor)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=20000, help="procedural training images")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=64, help="text and vision hidden size")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)

    import torch
    from transformers import CLIPModel, CLIPTokenizer

    torch.set_num_threads(args.threads)
    started, cpu_started, load_start = time.time(), time.process_time(), loadavg()

    def log(message):
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(args.seed)
    model = CLIPModel(model_config(args.width, args.width, args.layers, args.width))
    images, labels = make_images(args.images, np.random.default_rng([args.seed, 1]))
    assert not set(labels) & set(shapes.HELD_OUT)
    log(f"{len(images)} images; {sum(p.numel() for p in model.parameters())} parameters")
    command = "python tools/train_shapes_clip.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_clip_tokenizer_files(tokenizer_dir, find_clip_vocab())
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
        block_means = train(model, tokenizer, images, labels, args, log)
        report = {"command": command, "seed": args.seed, "held_out": [" ".join(c) for c in shapes.HELD_OUT],
                  "held_out_of": "training images and captions", "resolution": RESOLUTION, "images": args.images,
                  "steps": args.steps, "batch": args.batch, "lr": args.lr, "width": args.width, "layers": args.layers,
                  "patch_size": 4, "parameters": sum(p.numel() for p in model.parameters()), "weights": "fp16",
                  "threads": args.threads, "cpu": cpu_name(), "torch": torch.__version__,
                  "train_seconds": round(time.time() - started, 1),
                  "train_cpu_seconds": round(time.process_time() - cpu_started, 1),
                  "loadavg_start_end": [load_start, loadavg()],
                  "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
                  f"loss_per_{args.log_every}_steps": block_means}
        save(model, tokenizer_dir, args.out_dir, report)
    # Measured after saving: the numbers describe the fp16 folder users get.
    report.update(measure(args.out_dir))
    report["measure_seconds"] = round(time.time() - started - report["train_seconds"], 1)
    from textual_inversion_core.atomic import atomic_path

    with atomic_path(os.path.join(args.out_dir, "training.json")) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out_dir}: {json.dumps({k: v for k, v in report.items() if 'loss' not in k})}")


def loadavg():
    """The 1-minute load average: wall times mean little on a shared machine without it."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
