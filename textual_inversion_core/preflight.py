"""Checks and inputs both trainers settle before loading any model: errors arrive in seconds."""

import collections
import os
import sys

import numpy as np

from . import checkpoints, embeddings
from .data import TextualInversionDataset
from .errors import UserError

RunInputs = collections.namedtuple("RunInputs", "dataset resume_path resume_tensors resume_state init_vectors")


def check_output_dir(path):
    if int(os.environ.get("RANK", "0")) != 0:
        return  # only the first process writes, so only it probes (and creates) the folder
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".tmp-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"--output_dir {path!r} is not writable ({err.strerror}); choose a folder you can write to") from err


def load_run_inputs(args):
    """Decode the images, find the checkpoint to resume and read --init_from, all before any model."""
    check_output_dir(args.output_dir)
    dataset = TextualInversionDataset(
        args.train_data_dir, learnable_property=args.learnable_property, size=args.resolution,
        repeats=args.repeats, center_crop=args.center_crop, num_workers=args.dataloader_num_workers,
        skip_bad_images=args.skip_bad_images, placeholder_token=args.placeholder_token,
        caption_extension=args.caption_extension, caption_from_filename=args.caption_from_filename,
        prompt_template_file=args.prompt_template_file, recursive=args.recursive, exclude_dirs=[args.output_dir],
        enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps, random_crop=args.random_crop, alpha_mask=args.alpha_mask,
        mask_dir=args.mask_dir if args.masked_loss else None)
    if dataset.buckets is not None and int(os.environ.get("RANK", "0")) == 0 \
            and int(os.environ.get("JAX_PROCESS_ID", "0")) == 0:
        # Said at start, before any model loads: which shapes the run trains at, and how many images each has.
        print("\n".join(dataset.bucket_summary()), file=sys.stderr, flush=True)
    resume_path = checkpoints.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    resume_tensors, resume_state = checkpoints.load_checkpoint(resume_path) if resume_path else (None, None)
    init_vectors = None
    if args.init_from:
        _, init_vectors = embeddings.read_embedding(args.init_from)
        if not np.isfinite(init_vectors).all():
            raise UserError(f"--init_from {args.init_from!r} contains NaN or infinite values; use an embedding from a "
                            "run that did not diverge")
        if init_vectors.shape[0] != args.num_vectors:
            raise UserError(f"--init_from {args.init_from!r} has {init_vectors.shape[0]} vectors but --num_vectors is "
                            f"{args.num_vectors}; pass --num_vectors {init_vectors.shape[0]}")
    return RunInputs(dataset, resume_path, resume_tensors, resume_state, init_vectors)


def fit_init_vectors(args, init_vectors, dims):
    """--init_from vectors for each text encoder, at its width (dims: one width per encoder). SDXL files hold
    clip_l and clip_g: each encoder takes the part of its width. Returns one array (or None) per encoder."""
    if init_vectors is None:
        return [None] * len(dims)
    if len(dims) == 1 and init_vectors.shape[1] == dims[0]:
        return [init_vectors]
    fitted = []
    for dim in dims:
        try:
            _, vectors = embeddings.read_embedding(args.init_from, expected_dim=dim)
        except UserError as err:
            raise UserError(f"--init_from: {err}") from None
        fitted.append(vectors)
    return fitted
