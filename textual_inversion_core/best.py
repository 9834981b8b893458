"""--select_best: which saved step to keep, by a stated rule over eval.json, written as learned_embeds-best.* and
<name>-best.* in every exported format.

Rules (candidates: the saved steps, learned_embeds-steps-N, and the final step):
  validation_loss  the lowest loss on the held-out images;
  reconstruction   the highest CLIP reconstruction (pictures of "a photo of S*" like the training images);
  editability      the highest CLIP editability (pictures of edit prompts like their text);
  balanced         the highest reconstruction among the steps whose editability is at least
                   (1 - BALANCED_MARGIN) x the initializer's words' editability (eval.json "initializer"; without it,
                   the earliest scored step's); when no step keeps that much, the most editable step.
Framework-free.
"""

import os

from . import embeddings
from .errors import UserError

RULES = ("validation_loss", "reconstruction", "editability", "balanced")
BALANCED_MARGIN = 0.10  # editability may fall at most 10 % below the initializer's


def add_select_flag(add):
    # argparse formats help strings with %, so a literal percent sign is written %%.
    add("--select_best", type=str, default=None, choices=RULES,
        help="(ours) Write the best saved step's embedding as learned_embeds-best.* and <name>-best.* (every "
             "--export_formats format), by the lowest validation loss (needs --validation_split or "
             "--validation_data_dir), the highest reconstruction or editability, or balanced: the highest "
             f"reconstruction among steps whose editability is within {BALANCED_MARGIN * 100:.0f} %% of the initializer's "
             "(these three need --eval_clip_model). The step and the reason go to the log, eval.json and the model card.")


def check_select_args(rule, has_scores, has_loss, has_steps, trainer_hint=""):
    """--select_best without what its rule needs: one line, before any model loads."""
    if rule is None:
        return
    if not has_steps:
        raise UserError(f"--select_best {rule} picks one of the saved steps, but none is saved; add --save_steps N "
                        "(e.g. a tenth of --max_train_steps)")
    if rule == "validation_loss" and not has_loss:
        raise UserError("--select_best validation_loss needs held-out images; add --validation_split 0.2 or "
                        "--validation_data_dir DIR")
    if rule != "validation_loss" and not has_scores:
        raise UserError(f"--select_best {rule} needs the CLIP scores; add --eval_clip_model MODEL{trainer_hint}")


def choose(entries, rule, initializer=None):
    """(step, reason) of the rule's pick among entries {step: eval.json entry} that have an embedding file."""
    key = "validation_loss" if rule == "validation_loss" else "reconstruction"
    candidates = {s: e for s, e in entries.items() if e.get("embedding") and isinstance(e.get(key), (int, float))}
    if rule != "validation_loss":
        candidates = {s: e for s, e in candidates.items() if isinstance(e.get("editability"), (int, float))}
    if not candidates:
        raise UserError(f"--select_best {rule}: no saved step has the scores it needs in eval.json")
    if rule == "validation_loss":
        step = min(candidates, key=lambda s: (candidates[s]["validation_loss"], s))
        entry = candidates[step]
        baseline = entry.get("validation_baseline")
        versus = f" (initializer's words: {baseline:.5f})" if isinstance(baseline, (int, float)) else ""
        return step, f"the lowest validation loss, {entry['validation_loss']:.5f}{versus}"
    if rule in ("reconstruction", "editability"):
        step = max(candidates, key=lambda s: (candidates[s][rule], -s))
        return step, f"the highest {rule}, {candidates[step][rule]:.4f}"
    if initializer and isinstance(initializer.get("editability"), (int, float)):
        reference, source = initializer["editability"], "the initializer's words'"
    else:
        first = min(candidates)
        reference, source = candidates[first]["editability"], f"step {first}'s"
    floor = (1 - BALANCED_MARGIN) * reference
    kept = {s: e for s, e in candidates.items() if e["editability"] >= floor}
    if kept:
        step = max(kept, key=lambda s: (kept[s]["reconstruction"], -s))
        return step, (f"balanced: the highest reconstruction, {kept[step]['reconstruction']:.4f}, among the {len(kept)} "
                      f"step(s) whose editability is at least {floor:.4f} ({1 - BALANCED_MARGIN:.0%} of {source} "
                      f"{reference:.4f}); its editability {kept[step]['editability']:.4f}")
    step = max(candidates, key=lambda s: (candidates[s]["editability"], -s))
    return step, (f"balanced: no step keeps editability within {BALANCED_MARGIN:.0%} of {source} {reference:.4f}; "
                  f"the most editable, {candidates[step]['editability']:.4f}")


def read_step_vectors(path):
    """The vectors of a saved step's diffusers file: one array, or SDXL's {"clip_l", "clip_g"} (with its _2 twin)."""
    if embeddings.sdxl_twin_path(path):
        return embeddings.load_sdxl_embedding(path).vectors
    return embeddings.read_embedding(path)[1]


def write_best(output_dir, token, vectors, step, base_model, export_formats, safe_serialization, base_model_hash=None):
    """learned_embeds-best.* (diffusers; SDXL: with learned_embeds_2-best.*) and <name>-best.pt / .safetensors in the
    asked-for formats, as write_all names the final files. Returns the paths."""
    written = embeddings.write_diffusers(output_dir, token, vectors, safe_serialization=safe_serialization,
                                         suffix="-best")
    stem = embeddings.file_stem_for_token(token) + "-best"
    if embeddings.is_sdxl_vectors(vectors):
        if {"a1111", "kohya"} & set(export_formats):
            written.append(embeddings.write_sdxl(os.path.join(output_dir, f"{stem}.safetensors"), token, vectors, step,
                                                 base_model, base_model_hash))
        return written
    if "a1111" in export_formats:
        written.append(embeddings.write_a1111(os.path.join(output_dir, f"{stem}.pt"), token, vectors, step, base_model,
                                              base_model_hash))
    if "kohya" in export_formats:
        written.append(embeddings.write_kohya(os.path.join(output_dir, f"{stem}.safetensors"), token, vectors, step,
                                              base_model, base_model_hash))
    return written


def chooser(rule, token, model, export_formats, safe_serialization, logger, revision=None, variant=None):
    """choose(record) for eval_record.Evaluation.finish: picks the rule's step, writes its files, records
    eval.json "best" and says which step and why in the log. Returns the paths written."""

    def pick(record):
        step, reason = choose(record.steps, rule, record.data.get("initializer"))
        source = os.path.join(record.output_dir, record.steps[step]["embedding"])
        base_hash = None
        if {"a1111", "kohya"} & set(export_formats):
            base_hash = embeddings.text_encoder_short_hash(model, revision=revision, variant=variant)
        written = write_best(record.output_dir, token, read_step_vectors(source), step,
                             embeddings.public_model_name(model), export_formats, safe_serialization, base_hash)
        record.data["best"] = {"rule": rule, "step": step, "reason": reason, "source": os.path.basename(source),
                               "files": [os.path.basename(p) for p in written]}
        logger.info("--select_best %s: step %d, %s; wrote %s", rule, step, reason,
                    ", ".join(os.path.basename(p) for p in written))
        return written

    return pick


def best_note(output_dir):
    """The model card's sentence on the best step (eval.json "best"), or ""."""
    import json

    path = os.path.join(output_dir, "eval.json")
    try:
        with open(path, encoding="utf-8") as f:
            best = json.load(f).get("best")
    except (OSError, ValueError):
        return ""
    if not best:
        return ""
    files = ", ".join(f"`{name}`" for name in best.get("files", []))
    return (f"The best step by `--select_best {best['rule']}` is step {best['step']}: {best['reason']}. "
            f"Its files: {files}; `eval.json` and `eval.png` hold every step's scores.")

