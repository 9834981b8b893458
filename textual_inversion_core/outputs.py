"""What both trainers write at the end of a run, in one place so the two cannot drift."""

import os

from . import embeddings, hub, plots

LOSS_CURVE_FILE = "loss.png"


def write_final_outputs(args, learned_vectors, global_step, loss_history):
    """Embedding files (diffusers + --export_formats), token and concept files, and loss.png.

    learned_vectors: float32 array [num_vectors, dim]; loss_history: [(step, loss), ...] of this run.
    Returns the paths written, in the order a user would look for them.
    """
    written = embeddings.write_all(args.output_dir, args.placeholder_token, learned_vectors, global_step,
                                   args.pretrained_model_name_or_path, args.learnable_property,
                                   export_formats=args.export_formats,
                                   safe_serialization=not args.no_safe_serialization)
    if loss_history:
        steps, losses = zip(*loss_history)
        written.append(plots.write_loss_curve(os.path.join(args.output_dir, LOSS_CURVE_FILE), steps, losses))
    return written


def finish_run(args, learned_vectors, global_step, loss_history, hub_repo_id, save_full_pipeline, logger):
    """The end of a run on the main process, in the same order for both trainers: the files above, then the full
    pipeline (save_full_pipeline(), the trainer's own) when asked for or needed by the push, then the Hub push."""
    written = write_final_outputs(args, learned_vectors, global_step, loss_history)
    if args.save_as_full_pipeline or args.push_to_hub:
        save_full_pipeline()
    if args.push_to_hub:
        hub.publish(args, hub_repo_id)
        logger.info("pushed to %s", hub_repo_id)
    logger.info("wrote %s", ", ".join(os.path.basename(p) for p in written))
    return written
