"""The Textual Inversion paper's scores of saved embeddings (Gal et al. 2022, section 5.1), and the command that
scores a finished run:

    python -m textual_inversion_core.evaluate OUTPUT_DIR --eval_clip_model openai/clip-vit-large-patch14 \\
        [--pretrained_model_name_or_path MODEL --train_data_dir DIR ...]

reconstruction: the mean CLIP cosine similarity between pictures sampled from "a photo of S*" ("a painting in the
style of S*" for a style) and the images of --train_data_dir; editability: the mean CLIP cosine similarity between
pictures sampled from edit prompts containing S* and the same prompts' text without S*. The edit prompts are a
fixed list per --learnable_property (EDIT_PROMPTS, ours, in the paper's spirit); every step is sampled with the
same seeds, so two scorings of one file agree and steps differ only by their vectors. The initializer's words in
place of S* are scored the same way, once, as the reference (eval.json "initializer").

This module is framework-free; the sampling and the CLIP model are torch_backend.scores (the command needs the
PyTorch environment). Scores go to eval.json (eval_record.py); steps already scored keep their scores.
"""

import argparse
import json
import os
import sys

import numpy as np

from . import data, families, flow_matching
from .errors import UserError

RECONSTRUCTION_PROMPTS = {"object": "a photo of {}", "style": "a painting in the style of {}"}
EDIT_PROMPTS = {
    "object": ["a photo of {} on the beach", "an oil painting of {}", "a pencil sketch of {}",
               "a photo of {} in the snow"],
    "style": ["a painting of a dog in the style of {}", "a painting of a house in the style of {}",
              "a portrait of a woman in the style of {}", "a painting of a mountain lake in the style of {}"],
}
SAMPLE_STREAM = 6  # keyed stream of the samples' seeds (data.py's streams are 0-3, the split's 5)


def without_token(prompt):
    """The edit prompt's text as the paper scores it: with the concept's place left out."""
    return " ".join(prompt.replace("{}", " ").split())


def check_clip_folder(name_or_path):
    """A local --eval_clip_model must be a CLIP model folder (config.json of model_type "clip" and the processor's
    preprocessor_config.json): one line otherwise, before any model loads. A hub id is checked when it loads."""
    if not name_or_path or not os.path.exists(name_or_path):
        return
    kind = None
    try:
        with open(os.path.join(name_or_path, "config.json"), encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        pass
    if kind == "clip" and os.path.isfile(os.path.join(name_or_path, "preprocessor_config.json")):
        return
    if kind == "clip":
        what = "it has no preprocessor_config.json (the image processor)"
    else:
        what = f"its config.json says model_type {kind!r}" if kind else "it has no readable config.json"
    raise UserError(f"--eval_clip_model {name_or_path!r} is not a CLIP model folder ({what}); give a CLIPModel saved "
                    "with its processor, e.g. a download of openai/clip-vit-large-patch14")


def reference_pictures(train_data_dir, resolution, center_crop=False, recursive=False):
    """The images of --train_data_dir as PIL pictures, as training reads them (resized to --resolution)."""
    from PIL import Image

    paths = data.find_images(train_data_dir, recursive=recursive)
    return [Image.fromarray(data.load_image(p, resolution, center_crop)) for p in paths]


class PaperScorer:
    """Scores of a placeholder text: clip embeds pictures and texts (unit vectors, numpy), sample(prompt, seeds)
    draws one picture per seed with the current vectors; references are the training pictures."""

    def __init__(self, clip, sample, references, learnable_property, num_samples, seed):
        self.clip, self.sample = clip, sample
        self.reference = clip.images(references)
        self.reconstruction_prompt = RECONSTRUCTION_PROMPTS[learnable_property]
        self.edit_prompts = EDIT_PROMPTS[learnable_property]
        self.edit_texts = clip.texts([without_token(p) for p in self.edit_prompts])
        self.seeds = [data.example_seed(seed, i, SAMPLE_STREAM) for i in range(num_samples)]

    def __call__(self, text):
        """{"reconstruction", "editability", "samples"} of the prompts with `text` in the concept's place."""
        pictures = self.clip.images(self.sample(self.reconstruction_prompt.format(text), self.seeds))
        reconstruction = float(np.mean(pictures @ self.reference.T))
        edits = [self.clip.images(self.sample(prompt.format(text), self.seeds)) @ target
                 for prompt, target in zip(self.edit_prompts, self.edit_texts)]
        return {"reconstruction": reconstruction, "editability": float(np.mean(np.concatenate(edits))),
                "samples": len(self.seeds) * (1 + len(self.edit_prompts))}


def add_scoring_flags(add):
    """The flags of the paper scores, shared by the trainers' parser (cli.py) and this command."""
    add("--eval_clip_model", type=str, default=None,
        help="(ours) A CLIP model (local folder or hub id, e.g. openai/clip-vit-large-patch14) to score every saved "
             "embedding with the Textual Inversion paper's reconstruction and editability (eval.json, eval.png). "
             "PyTorch trainer only, on the main process; the Flax trainer's runs are scored afterwards with "
             "`python -m textual_inversion_core.evaluate OUTPUT_DIR`.")
    add("--eval_num_samples", type=int, default=4,
        help="(ours) Pictures sampled per prompt when scoring a step (1 reconstruction prompt + 4 edit prompts).")
    add("--eval_inference_steps", type=int, default=25,
        help="(ours) DPM-Solver steps of each picture sampled when scoring a step.")


def check_scoring_args(args):
    for name in ("eval_num_samples", "eval_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    check_clip_folder(args.eval_clip_model)


# --------------------------------------------------------------------------------------------------
# The command: score a finished run's saved steps


def saved_steps(output_dir, final_step=None):
    """{step: embedding file name} of learned_embeds-steps-N.* (safetensors first), and the final
    learned_embeds.* at final_step when it is known."""
    import re

    found = {}
    for name in sorted(os.listdir(output_dir)):
        match = re.fullmatch(r"learned_embeds-steps-(\d+)\.(safetensors|bin)", name)
        if match and (int(match.group(1)) not in found or name.endswith(".safetensors")):
            found[int(match.group(1))] = name
    if final_step is not None and int(final_step) not in found:
        for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
            if os.path.isfile(os.path.join(output_dir, name)):
                found[int(final_step)] = name
                break
    return dict(sorted(found.items()))


def parse_command(argv):
    parser = argparse.ArgumentParser(prog="python -m textual_inversion_core.evaluate",
                                     description="Score a finished run's saved embeddings (reconstruction, "
                                                 "editability) into its eval.json and eval.png.")
    parser.add_argument("output_dir", help="The run's --output_dir (learned_embeds-steps-N.* files).")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="The model the run trained on (default: the one in eval.json).")
    parser.add_argument("--train_data_dir", default=None, help="The run's images (default: eval.json's).")
    parser.add_argument("--initializer_token", default=None,
                        help="The run's initializer, scored as the reference (default: eval.json's).")
    parser.add_argument("--resolution", type=int, default=None, help="Sample size (default: eval.json's, else 512).")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    add_scoring_flags(parser.add_argument)
    from .best import add_select_flag

    add_select_flag(parser.add_argument)
    # The training run's sample count, sampler steps and seed unless given: then both scorings agree.
    parser.set_defaults(eval_num_samples=None, eval_inference_steps=None)
    args = parser.parse_args(argv)
    if not args.eval_clip_model:
        parser.error("--eval_clip_model is required: the CLIP model that scores the pictures")
    return args


RUN_DEFAULTS = {"resolution": 512, "center_crop": False, "recursive": False, "seed": 0, "eval_num_samples": 4,
                "eval_inference_steps": 25, "export_formats": ["diffusers", "a1111", "kohya"], "safe_serialization": True,
                "revision": None, "variant": None, "initializer_token": None, "learnable_property": "object"}


def run_settings(args, record):
    """The run's settings: this command's flags first, then what the trainer wrote into eval.json ("run"), then the
    output folder's files (token_identifier.txt, type_of_concept.txt), then RUN_DEFAULTS."""
    folder = args.output_dir

    def read_text(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read().strip()

    settings = dict(RUN_DEFAULTS)
    settings.update({"placeholder_token": read_text("token_identifier.txt"),
                     "learnable_property": read_text("type_of_concept.txt") or "object"})
    settings.update({k: v for k, v in record.data.get("run", {}).items() if v is not None})
    for key in ("pretrained_model_name_or_path", "train_data_dir", "initializer_token", "resolution", "revision",
                "variant", "eval_num_samples", "eval_inference_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key, fix in (("pretrained_model_name_or_path", "pass --pretrained_model_name_or_path"),
                     ("train_data_dir", "pass --train_data_dir"),
                     ("placeholder_token", "the folder needs its token_identifier.txt")):
        if not settings.get(key):
            raise UserError(f"{folder}: the run's {key} is not recorded (no eval.json from training); {fix}")
    settings["eval_clip_model"] = args.eval_clip_model
    return argparse.Namespace(**settings, validation_seed=settings["seed"])


def main(argv=None):
    args = parse_command(sys.argv[1:] if argv is None else argv)
    from . import best, eval_record

    if not os.path.isdir(args.output_dir):
        raise UserError(f"{args.output_dir!r} is not a folder; give a run's --output_dir")
    check_clip_folder(args.eval_clip_model)
    record = eval_record.EvalRecord(args.output_dir)
    settings = run_settings(args, record)
    check_scoring_args(settings)
    spec = families.family_of(settings.pretrained_model_name_or_path, settings.revision)
    if spec is not None:  # SD3 / Flux.1 steps are not scored yet: one line, before any model loads
        flow_matching.check_for_family(settings, spec)
    steps = saved_steps(args.output_dir, record.data.get("final_step"))
    best.check_select_args(args.select_best, has_scores=True, has_loss=any(
        "validation_loss" in e for e in record.steps.values()), has_steps=bool(steps))
    if not steps:
        raise UserError(f"{args.output_dir!r} holds no learned_embeds-steps-N file; train with --save_steps N")

    import logging

    from torch_backend import scores

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger = logging.getLogger("evaluate")
    first = os.path.join(args.output_dir, next(iter(steps.values())))
    models, placeholder_text = scores.load_scoring_models(settings, best.read_step_vectors(first))
    device = scores.default_device()
    models_on(models, device)
    evaluation = eval_record.Evaluation(args.output_dir, paper=scores.paper_scorer(settings, models, device),
                                        resuming=True, placeholder_text=placeholder_text,
                                        initializer_text=settings.initializer_token)
    for step, name in steps.items():
        scores.set_vectors(models, best.read_step_vectors(os.path.join(args.output_dir, name)))
        entry = evaluation.score(step)
        logger.info("step %d (%s): reconstruction %.4f, editability %.4f", step, name, entry["reconstruction"],
                    entry["editability"])
    choose = None
    if args.select_best:
        choose = best.chooser(args.select_best, settings.placeholder_token, settings.pretrained_model_name_or_path,
                              settings.export_formats, settings.safe_serialization, logger, settings.revision,
                              settings.variant)
    written = evaluation.finish(record.data.get("final_step"), choose)
    logger.info("wrote %s", ", ".join(written))
    print("\n".join(written))
    return 0


def models_on(models, device):
    for module in [models.vae, models.denoiser] + list(models.text_encoders):
        module.to(device)


if __name__ == "__main__":
    from .errors import run_cli

    sys.exit(run_cli(main))
