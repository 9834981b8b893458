"""Checks and inputs both trainers settle before loading any model: errors arrive in seconds."""

import collections
import hashlib
import os
import sys
import warnings

import numpy as np

from . import checkpoints, controls, embeddings, families, flow_matching, run, validation
from .data import TextualInversionDataset
from .errors import UserError
from .processes import ONE_PROCESS, decode_checkpoint, encode_checkpoint

# validation: the held-out images' TextualInversionDataset (--validation_split / --validation_data_dir), or None.
RunInputs = collections.namedtuple("RunInputs", "dataset resume_path resume_tensors resume_state init_vectors validation",
                                   defaults=(None,))


def check_output_dir(path, is_main=True):
    if not is_main:
        return  # only the first process writes, so only it probes (and creates) the folder
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".tmp-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"--output_dir {path!r} is not writable ({err.strerror}); choose a folder you can write to") from err


def load_run_inputs(args, optimizer=run.ADAMW, processes=ONE_PROCESS):
    """Decode the images, find the checkpoint to resume and read --init_from, all before any model. optimizer
    (run.ADAMW or run.ADAMW_8BIT): the trainer's, which the checkpoint's state must belong to.

    With several processes (processes: this one's index and a collective from the trainer's framework), each
    reads its own inputs and a problem on any stops all of them in one line; the checkpoint is the one process 0
    finds in its output folder (the only one written to), sent to the others."""
    inputs = processes.agree(lambda: _read_run_inputs(args, optimizer, processes.is_main))
    if processes.count > 1:
        dataset = inputs.dataset
        names = [os.path.relpath(p, dataset.data_root) for p in dataset.image_paths]
        processes.check_same("the training data (images, captions, repeats)", [len(dataset), names, dataset.captions],
                             "give every host the same --train_data_dir contents")
        if inputs.init_vectors is not None:
            processes.check_same(f"--init_from {args.init_from!r}",
                                 [hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                                  for v in inputs.init_vectors], "copy the same file to every host")
        if args.resume_from_checkpoint:
            found = (inputs.resume_path, inputs.resume_tensors, inputs.resume_state) if inputs.resume_path else None
            found = decode_checkpoint(processes.broadcast(encode_checkpoint(found)))
            inputs = inputs._replace(**dict(zip(("resume_path", "resume_tensors", "resume_state"),
                                                found or (None, None, None))))
    return inputs


def _read_run_inputs(args, optimizer, is_main):
    check_output_dir(args.output_dir, is_main)
    spec = families.family_of(args.pretrained_model_name_or_path, args.revision)
    if spec is not None:  # T5 flags without T5, DDPM controls on a flow model, flow flags on a DDPM one
        flow_matching.check_for_family(args, spec)
    if args.min_timestep is not None or args.max_timestep is not None:  # against the model's scheduler, when readable
        controls.check_timestep_range(args.min_timestep, args.max_timestep,
                                      controls.scheduler_timesteps(args.pretrained_model_name_or_path, args.revision))
    train_paths, held_out = validation.held_out(args)  # the held-out images leave the training set
    with warnings.catch_warnings():
        if not is_main:  # every process reads the images; the first one reports on them
            warnings.simplefilter("ignore")
        dataset = TextualInversionDataset(
            args.train_data_dir, learnable_property=args.learnable_property, size=args.resolution,
            repeats=args.repeats, center_crop=args.center_crop, num_workers=args.dataloader_num_workers,
            skip_bad_images=args.skip_bad_images, placeholder_token=args.placeholder_token,
            caption_extension=args.caption_extension, caption_from_filename=args.caption_from_filename,
            prompt_template_file=args.prompt_template_file, recursive=args.recursive, exclude_dirs=[args.output_dir],
            enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
            max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
            random_crop=args.random_crop, alpha_mask=args.alpha_mask, mask_dir=args.mask_dir if args.masked_loss else None,
            image_paths=train_paths)
    if dataset.buckets is not None and is_main:
        # Said at start, before any model loads: which shapes the run trains at, and how many images each has.
        print("\n".join(dataset.bucket_summary()), file=sys.stderr, flush=True)
    # Only process 0 writes checkpoints, so only its output folder is searched (load_run_inputs shares the result).
    resume_path = checkpoints.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) if is_main else None
    resume_tensors, resume_state = checkpoints.load_checkpoint(resume_path) if resume_path else (None, None)
    if resume_state is not None:
        run.check_optimizer(resume_path, resume_state, optimizer)
    family = spec.name if spec is not None else None
    if spec is not None and resume_tensors is not None:  # a checkpoint of another family (SD-1.x on SDXL, ...)
        trained = [e.file_key for e in families.trained_encoders(spec, getattr(args, "enable_t5_ti", False))]
        run.check_checkpoint_family(resume_path, resume_tensors, resume_state, spec, trained)
    init_vectors = read_init_from(args, family) if args.init_from else None
    return RunInputs(dataset, resume_path, resume_tensors, resume_state, init_vectors, held_out)


def model_family(name_or_path, revision=None):
    """The family's name ("sd", "sdxl", "sd3", "flux") from the pipeline's model_index.json, without loading a model;
    None when this cannot be told yet (then the trainer decides once the model is loaded). See families.family_of."""
    spec = families.family_of(name_or_path, revision)
    return spec.name if spec is not None else None


def read_init_from(args, family, widths=None):
    """--init_from as one float32 [num_vectors, dim] array per trained text encoder, in the pipeline's order (SDXL:
    text_encoder's, then text_encoder_2's; SD3 / Flux.1: the CLIP encoders', then T5's with --enable_t5_ti). With the
    family still unknown, the file is read as it is (fit_init_vectors takes the right parts once the model is
    loaded). widths: see embeddings.load_model_embedding."""
    path = args.init_from
    if family is None:
        sets = [embeddings.read_embedding(path)[1]]
    else:
        spec = families.get(family)
        if widths is None:
            widths = embeddings.text_encoder_widths(args.pretrained_model_name_or_path, spec, args.revision)
        try:
            found = embeddings.load_model_embedding(path, spec, widths)
        except UserError as err:
            raise UserError(f"--init_from: {err}") from None
        found = getattr(found, "vectors", found)
        if spec.tagged_files:
            enable_t5_ti = getattr(args, "enable_t5_ti", False)
            trained = families.trained_encoders(spec, enable_t5_ti)
            missing = [encoder for encoder in trained if encoder.file_key not in found]
            if missing:
                held = ", ".join(found)
                fix = "train without --enable_t5_ti" if enable_t5_ti and {e.kind for e in missing} == {"t5"} \
                    else "use an embedding of every trained text encoder"
                raise UserError(f"--init_from {path!r} has no {missing[0].file_key} part (it holds {held}) but this run "
                                f"trains {missing[0].subfolder}: {fix}")
            sets = [found[encoder.file_key] for encoder in trained]
        else:
            sets = [found["clip_l"], found["clip_g"]] if isinstance(found, dict) else [found]
    for vectors in sets:
        if not np.isfinite(vectors).all():
            raise UserError(f"--init_from {path!r} contains NaN or infinite values; use an embedding from a "
                            "run that did not diverge")
        if vectors.shape[0] != args.num_vectors:
            raise UserError(f"--init_from {path!r} has {vectors.shape[0]} vectors but --num_vectors is "
                            f"{args.num_vectors}; pass --num_vectors {vectors.shape[0]}")
    return sets


def fit_init_vectors(args, init_sets, dims, family=None):
    """--init_from vectors for each trained text encoder, at its width (dims: one width per trained encoder, known
    once the model is loaded; family: the model's, else SD or SDXL by the number of dims). Returns one array (or
    None) per trained encoder; a file that does not fit the model is a one-line error."""
    if init_sets is None:
        return [None] * len(dims)
    if len(init_sets) == len(dims) and [v.shape[1] for v in init_sets] == list(dims):
        return list(init_sets)
    spec = families.get(family or ("sdxl" if len(dims) == 2 else "sd"))
    if spec.tagged_files:
        trained = families.trained_encoders(spec, getattr(args, "enable_t5_ti", False))
        return read_init_from(args, spec, {encoder.file_key: dim for encoder, dim in zip(trained, dims)})
    return read_init_from(args, spec.name, tuple(dims))
