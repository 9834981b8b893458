"""What both trainers write at the end of a run, in one place so the two cannot drift."""

import json
import os

from . import atomic, best, embeddings, families, hub, plots

LOSS_CURVE_FILE = "loss.png"
# Keys in which diffusers/transformers save_pretrained record where a part was loaded from.
SOURCE_KEYS = ("_name_or_path", "name_or_path")


def write_final_outputs(args, learned_vectors, global_step, loss_history, family=None):
    """Embedding files (diffusers + --export_formats), token and concept files, and loss.png.

    learned_vectors: float32 array [num_vectors, dim], or {file_key: [n, dim]} of each trained text encoder in the
    pipeline's order (SDXL's {"clip_l", "clip_g"}; SD3 / Flux.1 clip_l, clip_g, t5xxl): one diffusers file per
    encoder, and for a1111/kohya the one webui/ComfyUI file; family: the model's (default: from its
    model_index.json, else told from the vectors); loss_history: [(step, loss), ...] of this run.
    Returns the paths written, in the order a user would look for them.
    """
    model = args.pretrained_model_name_or_path
    family = family or families.family_of(model, getattr(args, "revision", None))
    base_hash = None
    if {"a1111", "kohya"} & set(args.export_formats):  # only those files store it; hashing reads the whole file
        base_hash = embeddings.text_encoder_short_hash(model, revision=getattr(args, "revision", None),
                                                       variant=getattr(args, "variant", None))
    written = embeddings.write_all(args.output_dir, args.placeholder_token, learned_vectors, global_step,
                                   embeddings.public_model_name(model), args.learnable_property,
                                   export_formats=args.export_formats,
                                   safe_serialization=not args.no_safe_serialization, base_model_hash=base_hash,
                                   family=family)
    if loss_history:
        steps, losses = zip(*loss_history)
        written.append(plots.write_loss_curve(os.path.join(args.output_dir, LOSS_CURVE_FILE), steps, losses))
    return written


def replace_local_model_paths(pipeline_dir, model_name_or_path):
    """In a saved pipeline's config files, replace the recorded source of each part by the base model's public
    name (see embeddings.public_model_name) where it is a path of this machine: a local folder, or the Hub cache
    a hub model was read from. Returns the files rewritten."""
    index_path = os.path.join(pipeline_dir, "model_index.json")
    if not os.path.isfile(index_path):
        return []
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    configs = [index_path] + sorted(
        os.path.join(pipeline_dir, part, name) for part in parts if os.path.isdir(os.path.join(pipeline_dir, part))
        for name in os.listdir(os.path.join(pipeline_dir, part)) if name.endswith(".json"))
    public_name = embeddings.public_model_name(model_name_or_path)
    rewritten = []
    for path in configs:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            continue
        local = [k for k in SOURCE_KEYS if isinstance(config.get(k), str) and config[k]
                 and (embeddings.is_local_model(config[k]) or embeddings.model_name_without_path(config[k]) != config[k])]
        if local:
            config.update({k: public_name for k in local})
            atomic.write_text(path, json.dumps(config, indent=2) + "\n")
            rewritten.append(path)
    return rewritten


def finish_run(args, learned_vectors, global_step, loss_history, hub_repo_id, save_full_pipeline, logger, family=None,
               evaluation=None):
    """The end of a run on the main process, in the same order for both trainers: the files above (and with an
    evaluation, eval_record.Evaluation, eval.json and eval.png), then the full pipeline (save_full_pipeline(), the
    trainer's own) when asked for or needed by the push, then the Hub push. family: see write_final_outputs."""
    family = families.get(family) if family else families.family_of(args.pretrained_model_name_or_path,
                                                                      getattr(args, "revision", None))
    written = write_final_outputs(args, learned_vectors, global_step, loss_history, family=family)
    if evaluation is not None:
        choose = None
        if args.select_best:
            choose = best.chooser(args.select_best, args.placeholder_token, args.pretrained_model_name_or_path,
                                  args.export_formats, not args.no_safe_serialization, logger, args.revision,
                                  args.variant)
        evaluated = evaluation.finish(global_step, choose)
        logger.info("scores per step: %s", " and ".join(evaluated[:2]))
        written += evaluated
    if args.save_as_full_pipeline or args.push_to_hub:
        save_full_pipeline()
        replace_local_model_paths(args.output_dir, args.pretrained_model_name_or_path)
    if args.push_to_hub:
        hub.publish(args, hub_repo_id, sdxl=embeddings.is_sdxl_vectors(learned_vectors),
                    family=family.name if family else None)
        logger.info("pushed to %s", hub_repo_id)
    logger.info("wrote %s", ", ".join(os.path.basename(p) for p in written))
    return written
