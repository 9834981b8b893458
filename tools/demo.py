#!/usr/bin/env python
"""`make demo`: train <cat-toy> on the bundled example images with the tiny offline pipeline, then
generate a picture with the learned token through diffusers, exactly as a user would afterwards.

Everything runs on the CPU in about a minute; the tiny pipeline has random weights, so the picture
shows the plumbing working end to end, not a good image.
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOKEN = "<cat-toy>"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=os.path.join(REPO, "demo-output"))
    parser.add_argument("--pipeline_dir", default=os.path.join(REPO, "build", "tiny-pipeline"))
    parser.add_argument("--max_train_steps", type=int, default=100)
    args = parser.parse_args()
    started = time.time()

    if not os.path.isfile(os.path.join(args.pipeline_dir, "model_index.json")):
        from tools.make_tiny_pipeline import make_pipeline

        print(f"making the tiny pipeline in {args.pipeline_dir} ...", flush=True)
        make_pipeline(args.pipeline_dir, size="tiny", seed=0)

    command = [
        sys.executable, os.path.join(REPO, "textual_inversion.py"),
        f"--pretrained_model_name_or_path={args.pipeline_dir}",
        f"--train_data_dir={os.path.join(REPO, 'examples', 'toy')}",
        "--learnable_property=object", f"--placeholder_token={TOKEN}", "--initializer_token=toy",
        "--resolution=64", "--train_batch_size=4", f"--max_train_steps={args.max_train_steps}",
        "--learning_rate=5.0e-03", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=0",
        f"--validation_prompt=a photo of {TOKEN}", "--num_validation_images=2",
        f"--validation_steps={max(1, args.max_train_steps // 4)}",
        f"--checkpointing_steps={max(1, args.max_train_steps // 2)}", "--checkpoints_total_limit=1",
        f"--output_dir={args.output_dir}",
    ]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(args.output_dir)
    prompt = f"A {TOKEN} backpack"
    image = pipe(prompt, num_inference_steps=25, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    sample = os.path.join(args.output_dir, "sample.png")
    image.resize((256, 256)).save(sample)

    from textual_inversion_core import plots
    from textual_inversion_core.embeddings import file_stem_for_token

    out, stem = args.output_dir, file_stem_for_token(TOKEN)
    grid = plots.write_validation_grid(os.path.join(out, "validation"), os.path.join(out, "validation_grid.png"))
    print()
    print(f"Done in {time.time() - started:.0f} s. Everything is in {out}/")
    print(f"  token           {TOKEN}   (A1111 / ComfyUI trigger word: {stem})")
    print("  diffusers       learned_embeds.safetensors, learned_embeds.bin")
    print(f"  AUTOMATIC1111   {stem}.pt          -> webui embeddings/ folder, write {stem!r} in a prompt")
    print(f"  ComfyUI, kohya  {stem}.safetensors -> ComfyUI/models/embeddings/, write 'embedding:{stem}'")
    print("  loss curve      loss.png")
    if grid:
        print(f"  validation grid {os.path.basename(grid)}   (rows: training steps, from validation/)")
    print(f"  sample image    {os.path.basename(sample)}        (prompt: {prompt!r})")
    print("  use it in diffusers:")
    print("      from diffusers import StableDiffusionPipeline")
    print(f"      pipe = StableDiffusionPipeline.from_pretrained({args.pipeline_dir!r})")
    print(f"      pipe.load_textual_inversion({out!r})")
    print(f"      image = pipe({prompt!r}).images[0]")
    print("  other formats:  python -m textual_inversion_core.convert IN OUT   (see README, Use your embedding)")


if __name__ == "__main__":
    main()
