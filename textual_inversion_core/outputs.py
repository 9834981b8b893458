"""What both trainers write at the end of a run, in one place so the two cannot drift."""

import os

from . import embeddings, plots

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
