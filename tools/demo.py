#!/usr/bin/env python
"""`make demo`: learn a concept the base model has never seen, and show it being learned.

The base model is the small pretrained shapes pipeline bundled with the tests (tests/assets/shapes-sd,
see README "Proof that it learns"); it has seen purple things and stars, never a purple star. The demo
draws five purple stars, trains a new token <my-shape> on them with textual_inversion.py (initialised
from the word "shape"), exactly as a user would, then loads the embeddings the run saved along the way
with diffusers' load_textual_inversion and writes one picture: samples of "a photo of a shape" next to
samples of "a photo of a <my-shape>" after a few step counts, each column with the fraction of its
samples the hand-written judge (tools/shapes.py) reads as a purple star. The run also scores every saved step
(README "Which step is the good one?"): the validation loss on five other purple stars, the paper's reconstruction
and editability with the shapes CLIP (tests/assets/shapes-clip), and keeps the step `--select_best balanced` picks
as learned_embeds-best.*; the demo prints those scores per saved step next to the judged rates. Offline, CPU only,
one thread.
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import shapes  # noqa: E402

TOKEN = "<my-shape>"
CONCEPT = shapes.DEV_CONCEPT
PIPELINE = os.path.join(REPO, "tests", "assets", "shapes-sd")
# Columns of the picture: the token after these many steps (the last is the end of the run).
SHOWN_STEPS = (25, 50, 100, 200)
SAMPLES_SHOWN = 8  # per column; the judged rate under it counts all shapes.GENERATED samples
SELECT_BEST = "balanced"  # the --select_best rule the run keeps a step by


def train_command(data_dir, validation_dir, output_dir, steps, seed):
    options = dict(shapes.RECIPE, pretrained_model_name_or_path=PIPELINE, train_data_dir=data_dir,
                   placeholder_token=TOKEN, max_train_steps=steps[-1], save_steps=steps[0], seed=seed,
                   validation_prompt=f"a photo of a {TOKEN}", num_validation_images=4, validation_steps=steps[-1] // 2,
                   checkpointing_steps=steps[-1] // 2, checkpoints_total_limit=1, report_to="none",
                   validation_data_dir=validation_dir, select_best=SELECT_BEST, **shapes.SCORING_FLAGS,
                   output_dir=output_dir)
    return [sys.executable, os.path.join(REPO, "textual_inversion.py")] + [f"--{k}={v}" for k, v in options.items()]


def picture(columns, path):
    """columns: [(title, images, judged rate or None)] -> one PNG: a block of images per column, title above, rate below."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from textual_inversion_core.atomic import atomic_path

    scale, per_row, pad = 3, 2, 4
    cell = 32 * scale
    block_w = per_row * cell + (per_row - 1) * pad
    rows = (SAMPLES_SHOWN + per_row - 1) // per_row
    block_h = rows * cell + (rows - 1) * pad
    gutter, head, foot = 24, 44, 40
    width = len(columns) * block_w + (len(columns) + 1) * gutter
    canvas = Image.new("RGB", (width, head + block_h + foot), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for c, (title, images, rate) in enumerate(columns):
        left = gutter + c * (block_w + gutter)
        for line, text in enumerate(title.split("\n")):
            draw.text((left, 6 + 16 * line), text, fill="black", font=font)
        for i, image in enumerate(images[:SAMPLES_SHOWN]):
            big = Image.fromarray(np.asarray(image)).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(big, (left + (i % per_row) * (cell + pad), head + (i // per_row) * (cell + pad)))
        if rate is None:
            continue
        judged = round(rate * shapes.GENERATED)
        draw.text((left, head + block_h + 8), f"judged {' '.join(CONCEPT)}:", fill="black", font=font)
        draw.text((left, head + block_h + 22), f"{judged}/{shapes.GENERATED} = {rate:.0%}", fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def write_numbers(path, words, results, files, seed, **seconds):
    """The picture's numbers as JSON (tests/test_learning.py reads them): per column the judged rate of
    shapes.GENERATED samples and the paired concept loss."""
    import json

    from textual_inversion_core.atomic import atomic_path

    numbers = {"concept": " ".join(CONCEPT), "token": TOKEN, "seed": seed, "samples": shapes.GENERATED,
               "words": {"rate": words["rate"], "loss": words["loss"]},
               "initializer": {"rate": results["initializer"]["rate"], "loss": results["initializer"]["loss"]},
               "token_after_steps": {str(step): {"rate": results[f]["rate_token"], "loss": results[f]["loss_token"],
                                                 "file": os.path.basename(f)} for step, f in zip(SHOWN_STEPS, files)},
               **{k: round(v, 1) for k, v in seconds.items()}}
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(numbers, f, indent=1)


def score_lines(out, judged):
    """The demo's table of step scores: per saved step (and the initializer's words) the judged rate where the
    picture has it, the validation loss, reconstruction and editability from eval.json; then the kept step."""
    import json

    from textual_inversion_core import eval_record

    with open(os.path.join(out, eval_record.FILE), encoding="utf-8") as f:
        record = json.load(f)
    steps = {int(k): v for k, v in record["steps"].items() if v.get("embedding")}

    def number(value, spec):
        return "–" if value is None else format(value, spec)

    rows = [("step", "judged", "val. loss", "reconstruction", "editability")]
    first = steps[min(steps)]
    initializer = record.get("initializer", {})
    rows.append((f'"{shapes.GENERIC_WORD}"', number(judged.get("initializer"), ".0%"),
                 number(first.get("validation_baseline"), ".5f"), number(initializer.get("reconstruction"), ".4f"),
                 number(initializer.get("editability"), ".4f")))
    for step, entry in sorted(steps.items()):
        rows.append((str(step), number(judged.get(step), ".0%"), number(entry.get("validation_loss"), ".5f"),
                     number(entry.get("reconstruction"), ".4f"), number(entry.get("editability"), ".4f")))
    lines = ["  " + " " * 16 + "  ".join(cell.rjust(width) for cell, width in zip(row, (7, 6, 9, 14, 11)))
             for row in rows]
    best = record.get("best")
    if best:
        reason = best["reason"].removeprefix(f"{best['rule']}: ")  # the balanced rule's reason names itself
        lines.append(f"  best step       {best['step']}   (--select_best {best['rule']}: {reason}; "
                     f"learned_embeds-best.*, {file_stem(TOKEN)}-best.*)")
    return lines


def file_stem(token):
    from textual_inversion_core.embeddings import file_stem_for_token

    return file_stem_for_token(token)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=os.path.join(REPO, "demo-output"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    out = args.output_dir
    data_dir = shapes.write_concept_images(os.path.join(out, "training-images"), CONCEPT)
    print(f"wrote 5 pictures of a {' '.join(CONCEPT)} to {data_dir}/ (the base model never saw one)", flush=True)

    validation_dir = shapes.write_concept_images(os.path.join(out, "validation-images"), CONCEPT,
                                                 count=shapes.VALIDATION_IMAGES, seed=shapes.VALIDATION_IMAGE_SEED)
    print(f"wrote {shapes.VALIDATION_IMAGES} other pictures of it to {validation_dir}/ (held out: the validation loss)",
          flush=True)
    command = train_command(data_dir, validation_dir, out, SHOWN_STEPS, args.seed)
    print("$ " + " ".join(command), flush=True)
    # One thread: the model is tiny, and a second thread only adds overhead.
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    trained = time.time()

    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    files = [os.path.join(out, f"learned_embeds-steps-{step}.safetensors") for step in SHOWN_STEPS]
    print(f"generating {shapes.GENERATED} samples per column and judging them ...", flush=True)
    pipe = shapes.load_pipeline(PIPELINE)
    words_prompt = f"a photo of a {' '.join(CONCEPT)}"
    words, words_images = shapes.measure_prompt(pipe, words_prompt, CONCEPT, keep_images=True)
    results = shapes.measure_embeddings(pipe, files, TOKEN, CONCEPT, keep_images=True)
    training = [np.asarray(Image.open(os.path.join(data_dir, name)).convert("RGB")) for name in sorted(os.listdir(data_dir))]
    columns = [("the 5 training\nimages", training, None), (f'"{words_prompt}"\n(the words)', words_images, words["rate"]),
               (f'"a photo of a {shapes.GENERIC_WORD}"\n(the initializer)', results["initializer"]["images"],
                results["initializer"]["rate"])]
    for step, path in zip(SHOWN_STEPS, files):
        columns.append((f'"a photo of a {TOKEN}"\nafter {step} steps', results[path]["images"],
                        results[path]["rate_token"]))
    learning = picture(columns, os.path.join(out, "learning.png"))
    write_numbers(os.path.join(out, "learning.json"), words, results, files, args.seed,
                  train_seconds=trained - started, total_seconds=time.time() - started)

    from textual_inversion_core import plots

    stem = file_stem(TOKEN)
    grid = plots.write_validation_grid(os.path.join(out, "validation"), os.path.join(out, "validation_grid.png"))
    rates = ", ".join(f"{step} steps {results[p]['rate_token']:.0%}" for step, p in zip(SHOWN_STEPS, files))
    print()
    print(f"Done in {time.time() - started:.0f} s (training {trained - started:.0f} s). Everything is in {out}/")
    print(f"  picture         {os.path.basename(learning)}   judged {' '.join(CONCEPT)}: words {words['rate']:.0%}, "
          f"initializer {results['initializer']['rate']:.0%}; token after {rates}")
    print(f"  token           {TOKEN}   (A1111 / ComfyUI trigger word: {stem})")
    print("  diffusers       learned_embeds.safetensors, learned_embeds.bin (and learned_embeds-steps-N.* on the way)")
    print(f"  AUTOMATIC1111   {stem}.pt          -> webui embeddings/ folder, write {stem!r} in a prompt")
    print(f"  ComfyUI, kohya  {stem}.safetensors -> ComfyUI/models/embeddings/, write 'embedding:{stem}'")
    print("  loss curve      loss.png")
    print("  step scores     eval.json, eval.png   (validation loss on the held-out purple stars: lower is better; "
          "shapes-CLIP scores: higher)")
    judged = {step: results[p]["rate_token"] for step, p in zip(SHOWN_STEPS, files)}
    judged["initializer"] = results["initializer"]["rate"]
    for line in score_lines(out, judged):
        print(line)
    if grid:
        print(f"  validation grid {os.path.basename(grid)}   (rows: training steps, from validation/)")
    print("  use it in diffusers:")
    print("      from diffusers import StableDiffusionPipeline")
    print(f"      pipe = StableDiffusionPipeline.from_pretrained({os.path.relpath(PIPELINE)!r})")
    print(f"      pipe.load_textual_inversion({out!r})")
    print(f"      image = pipe('a photo of a {TOKEN}', height=32, width=32, guidance_scale=4).images[0]")
    print("  other formats:  python -m textual_inversion_core.convert IN OUT   (see README, Use your embedding)")


if __name__ == "__main__":
    main()
