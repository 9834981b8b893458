"""The one command-line definition shared by the PyTorch and the Flax trainer.

Flag names and defaults follow diffusers' examples/textual_inversion scripts so that their command
lines run unchanged; flags we add are marked "(ours)". Both scripts build their parser here, so the
two --help outputs list the same flags and cannot drift.
"""

import argparse
import os
import sys

from . import best, controls, evaluate, flow_matching
from .errors import UserError
from .schedules import LR_SCHEDULERS

EXPORT_FORMATS = ("diffusers", "a1111", "kohya")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one line that names the problem and points at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog=None, description=None):
    p = _OneLineErrorParser(prog=prog, description=description or "Textual Inversion training.")
    add = p.add_argument

    # Saving
    add("--save_steps", type=int, default=500,
        help="Write learned_embeds-steps-N.(bin|safetensors) every N optimizer steps (0 disables).")
    add("--save_as_full_pipeline", action="store_true",
        help="Also save the whole pipeline, with the extended tokenizer and text encoder, to output_dir.")
    add("--num_vectors", type=int, default=1,
        help="How many embedding vectors the placeholder token stands for.")

    # Model
    add("--pretrained_model_name_or_path", type=str, default=None, required=True,
        help="Local pipeline folder or hub model id of the base Stable Diffusion model.")
    add("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the base model.")
    add("--variant", type=str, default=None, help="Weights variant of the base model files, e.g. fp16.")
    add("--tokenizer_name", type=str, default=None,
        help="Tokenizer folder or id, if not the model's own tokenizer/ subfolder.")

    # Data and concept
    add("--train_data_dir", type=str, default=None, required=True, help="Folder with the training images.")
    add("--placeholder_token", type=str, default=None, required=True,
        help="The new token that will stand for the concept, e.g. <cat-toy>.")
    add("--initializer_token", type=str, default=None, required=True,
        help="An existing word whose embedding initialises the new vectors, e.g. toy; or a phrase of such words, "
             "e.g. 'red toy car' (kohya's --init_word, A1111's initialization text): with at least as many "
             "--num_vectors as words each word fills an equal share of the vectors in order, with fewer each "
             "vector is the mean of a consecutive part of the phrase.")
    add("--learnable_property", type=str, default="object", choices=["object", "style"],
        help="Learn an object (prompts 'a photo of a X') or a style (prompts 'a painting in the style of X').")
    add("--repeats", type=int, default=100, help="How many times the image set is repeated in one epoch.")
    add("--skip_bad_images", action="store_true",
        help="(ours) Skip unreadable or corrupt image files with a warning instead of stopping.")
    add("--init_from", type=str, default=None,
        help="(ours) Start from an existing embedding file instead of the initializer token's embedding.")

    # Captions, prompt templates and what the data folder holds (see README "Captions and prompt templates").
    # All off by default: without them the prompts and the examples drawn are diffusers' exactly.
    add("--caption_extension", type=str, default=None,
        help="(kohya) Read each image's caption from the file with this extension next to it (photo1.jpg -> "
             "photo1.txt for .txt). A caption containing --placeholder_token is the prompt as it is; otherwise the "
             "prompt is 'template, caption' ('a photo of a <token>, caption'). Images without a caption file get the "
             "template alone (warned). Off by default.")
    add("--caption_from_filename", action="store_true",
        help="(ours; A1111's [filewords]) Caption each image by its file name (a leading number dropped, _ read as a "
             "space); with --caption_extension, only the images that have no caption file.")
    add("--prompt_template_file", type=str, default=None,
        help="(ours; A1111's template files) Prompt templates, one a line, instead of the built-in object/style "
             "lists: {token} stands for the placeholder token, {caption} for the image's caption (A1111's [name] and "
             "[filewords] work too). Every line needs {token}; blank lines and # lines are skipped.")
    add("--recursive", action="store_true",
        help="(ours; kohya's recursive) Also train on the images in subfolders of --train_data_dir (hidden folders "
             "and --output_dir excepted). Without it they are left out, with a warning.")

    # Aspect-ratio buckets and masked loss (see README "Aspect-ratio buckets" and "Masked loss"). All off by
    # default: without them every image is resized to the --resolution square and the loss is diffusers' MSE.
    add("--enable_bucket", action="store_true",
        help="(kohya) Train each image at the aspect ratio nearest its own instead of squashing it to a square: "
             "buckets of about --resolution x --resolution pixels, each image resized to cover its bucket and "
             "cropped to it (centred, or --random_crop); every optimizer step draws its whole batch from one bucket.")
    add("--min_bucket_reso", type=int, default=256,
        help="(kohya) Shortest bucket side in pixels, a multiple of --bucket_reso_steps.")
    add("--max_bucket_reso", type=int, default=1024,
        help="(kohya) Longest bucket side in pixels, a multiple of --bucket_reso_steps.")
    add("--bucket_reso_steps", type=int, default=64,
        help="(kohya) Bucket sides are multiples of this many pixels: a multiple of 8 (the VAE's factor); 64 keeps the "
             "latents divisible by SD's UNet.")
    add("--random_crop", action="store_true",
        help="(kohya) Crop each example at a random place (multiples of 8 px) instead of the centre: within the bucket "
             "with --enable_bucket, otherwise a random --resolution square of the image resized to it on its short side.")
    add("--masked_loss", action="store_true",
        help="(kohya) Weight the loss per latent pixel by a mask (white trains, black is left out), so the "
             "background does not go into the embedding: the mask images of --mask_dir, or with --alpha_mask "
             "(kohya's pairing) the images' alpha channel.")
    add("--mask_dir", type=str, default=None,
        help="(ours; kohya reads masks from conditioning_data_dir) Folder of the --masked_loss masks: one grayscale "
             "image per training image, same file name (any image extension), same size.")
    add("--alpha_mask", action="store_true",
        help="(kohya) Weight the loss by each image's alpha channel (transparent: left out); turns on the masked loss "
             "by itself or with --masked_loss. The pixels are still composited over white, as without the flag.")

    # Training controls (see README "Training controls"). All off by default: without them the loss, the noise,
    # the timesteps and the vectors are exactly those of diffusers' loop.
    add("--snr_gamma", type=float, default=None,
        help="(diffusers' train_text_to_image.py; kohya's --min_snr_gamma) Min-SNR-gamma loss weighting: each "
             "example's MSE is weighted by min(SNR(t), gamma) / SNR(t) (v_prediction: / (SNR(t) + 1)); 5.0 is the "
             "recommended value. Off by default. DDPM models only (refused for SD3/Flux.1).")
    add("--noise_offset", type=float, default=0.0,
        help="(diffusers, kohya) Add noise_offset x one random number per example and latent channel to the noise "
             "(each example's own draw); about 0.05-0.1 helps very dark or bright pictures. 0: off. DDPM models only "
             "(refused for SD3/Flux.1).")
    add("--min_timestep", type=int, default=None,
        help="(kohya) Draw timesteps from [min_timestep, max_timestep) instead of from 0 (the default). DDPM models "
             "only (refused for SD3/Flux.1).")
    add("--max_timestep", type=int, default=None,
        help="(kohya) Upper end (excluded) of the timestep range; default the scheduler's num_train_timesteps (1000). "
             "DDPM models only.")
    add("--preserve_embedding_norm", action="store_true",
        help="(OneTrainer) After every optimizer step rescale each learned vector to the L2 norm of its start vector "
             "(the initializer's, or --init_from's).")
    add("--max_embedding_norm", type=float, default=None,
        help="(ours) After every optimizer step scale down any learned vector whose L2 norm exceeds this cap.")

    # SD3/SD3.5 and Flux.1 (see README "SD3/SD3.5 and Flux.1"): flow matching as diffusers' SD3/Flux scripts train it.
    # Refused on SD-1.x/2.x and SDXL, where they mean nothing.
    add("--enable_t5_ti", action="store_true",
        help="(diffusers' advanced Flux script) Also learn vectors for the T5 text encoder (SD3's text_encoder_3, Flux's "
             "text_encoder_2), initialised from --initializer_token in T5's vocabulary. Without it only the CLIP "
             "encoders learn; T5 runs once per distinct prompt, its outputs are cached and it is freed.")
    add("--max_sequence_length", type=int, default=None,
        help="(diffusers) T5 tokens per prompt; default diffusers' training default: 77 for SD3, 512 for Flux.1.")
    add("--weighting_scheme", type=str, default=None, choices=flow_matching.WEIGHTING_SCHEMES,
        help="(diffusers) How sigmas are drawn and the loss weighted: logit_normal or mode draw sigmas non-uniformly, "
             "sigma_sqrt and cosmap weight the loss, none is uniform and unweighted; default diffusers' per script: "
             "logit_normal for SD3, none for Flux.1.")
    add("--logit_mean", type=float, default=None,
        help=f"(diffusers) Mean of the logit_normal draw (default {flow_matching.LOGIT_MEAN}).")
    add("--logit_std", type=float, default=None,
        help=f"(diffusers) Standard deviation of the logit_normal draw (default {flow_matching.LOGIT_STD}).")
    add("--mode_scale", type=float, default=None,
        help=f"(diffusers) Scale of the mode draw (default {flow_matching.MODE_SCALE}).")
    add("--guidance_scale", type=float, default=None,
        help=f"(diffusers' Flux scripts) The guidance input of a guidance-distilled Flux transformer (FLUX.1-dev) "
             f"during training (default {flow_matching.GUIDANCE_SCALE}); refused for a transformer without one.")

    # Output
    add("--output_dir", type=str, default="text-inversion-model",
        help="Where embeddings, checkpoints, logs and validation images are written.")
    add("--export_formats", type=str, default=",".join(EXPORT_FORMATS),
        help="(ours) Comma list of extra embedding formats to write: diffusers,a1111,kohya. "
             "The diffusers files are always written.")

    # Training
    add("--seed", type=int, default=None, help="Seed for a reproducible run (random if not given).")
    add("--resolution", type=int, default=512, help="Training images are resized to this square size.")
    add("--center_crop", action="store_true", help="Crop images to a centred square before resizing.")
    add("--train_batch_size", type=int, default=16, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=100)
    add("--max_train_steps", type=int, default=5000,
        help="Total optimizer steps; when given it overrides --num_train_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1,
        help="Micro-batches whose gradients are summed before one optimizer step.")
    add("--gradient_checkpointing", action="store_true",
        help="Recompute activations in the backward pass: slower, much less memory.")
    add("--learning_rate", type=float, default=1e-4, help="Learning rate (after warmup).")
    add("--scale_lr", action="store_true", default=False,
        help="Multiply the learning rate by batch size x accumulation steps x number of devices.")
    add("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
        help="Learning-rate schedule.")
    add("--lr_warmup_steps", type=int, default=500, help="Warmup optimizer steps of the schedule.")
    add("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    add("--dataloader_num_workers", type=int, default=0,
        help="Threads that decode and resize the training images (0: the main thread).")
    add("--use_8bit_adam", action="store_true",
        help="(diffusers' SDXL script) bitsandbytes' AdamW8bit for the vectors; needs bitsandbytes and a CUDA GPU. "
             "Its checkpoints hold AdamW8bit's own state and resume only with this flag.")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-08)

    # Hub
    add("--push_to_hub", action="store_true", help="Upload the result to the Hugging Face Hub.")
    add("--hub_token", type=str, default=None,
        help="Hub token (prefer `hf auth login` or HF_TOKEN); never written to disk or logs.")
    add("--use_auth_token", action="store_true",
        help="Accepted for compatibility with the diffusers Flax script; the stored login is used anyway.")
    add("--hub_model_id", type=str, default=None,
        help="Hub repository to push to (default: the output_dir's name).")

    # Logging, precision, validation
    add("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to output_dir.")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Run the frozen models in fp16 or bf16; the learned vectors stay fp32.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    add("--report_to", type=str, default="tensorboard",
        help="Where to log: tensorboard, wandb, comet_ml, all (the installed ones, as in Accelerate) or none. "
             "Validation images go to each.")
    add("--validation_prompt", type=str, default=None,
        help="Prompt (use the placeholder token in it) to sample during training.")
    add("--num_validation_images", type=int, default=4)
    add("--validation_steps", type=int, default=100, help="Sample validation images every N steps.")
    add("--validation_epochs", type=int, default=None,
        help="Deprecated in diffusers: validate every N epochs (converted to steps).")
    add("--logging_steps", type=int, default=10,
        help="(ours) Bring the loss to the host (progress bar, finite check, trackers) every N steps; every step's "
             "loss is still logged. Saving, validation and the last step always check it first.")
    add("--local_rank", type=int, default=-1, help="Set by distributed launchers.")

    # Validation loss on held-out images (see README "Which step is the good one?"). Off without
    # --validation_split or --validation_data_dir; --validation_prompt/--validation_steps keep meaning images.
    add("--validation_split", type=float, default=None,
        help="(kohya) Hold out this fraction of --train_data_dir's images (at least one; which ones is fixed by "
             "--validation_seed) and measure the denoising loss of the token's prompts on them, with fixed noise and "
             "timesteps, at every --save_steps step, every --validate_every_n_steps steps and the last step; the "
             "initializer's prompts on the same draws are the baseline. Logged as loss/validation and written to "
             "eval.json.")
    add("--validation_data_dir", type=str, default=None,
        help="(ours; kohya takes a validation folder from its dataset config) Measure the validation loss on the "
             "images of this folder instead of holding out part of --train_data_dir.")
    add("--validate_every_n_steps", type=int, default=None,
        help="(kohya) Also measure the validation loss every N steps (it is always measured at save steps and "
             "the last step).")
    # The Textual Inversion paper's scores of every saved step, and which step to keep.
    evaluate.add_scoring_flags(add)
    best.add_select_flag(add)
    add("--validation_seed", type=int, default=None,
        help="(kohya) Seed of the held-out split and of the validation draws (default: --seed, else 0), so the "
             "loss curve, a resumed run and a run on N processes see the same numbers.")

    # Checkpoints
    add("--checkpointing_steps", type=int, default=500,
        help="Save a resumable checkpoint-N/ every N optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help='Resume from "checkpoint-N" (or a path to one) or from "latest".')

    add("--enable_xformers_memory_efficient_attention", action="store_true",
        help="Use xFormers attention in the UNet and VAE (needs xformers and a CUDA GPU); "
             "the Flax script uses diffusers' chunked JAX attention.")
    add("--no_safe_serialization", action="store_true",
        help="Write learned_embeds only as .bin (torch pickle), not .safetensors.")
    return p


def check_args(args):
    """Cross-flag checks argparse cannot express. Raises UserError with a fix in the message."""
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1 and env_rank != args.local_rank:
        args.local_rank = env_rank

    if not args.placeholder_token or not args.placeholder_token.strip():
        raise UserError('--placeholder_token is empty; give the new token, e.g. --placeholder_token="<cat-toy>"')
    if any(c.isspace() for c in args.placeholder_token):
        raise UserError(f"--placeholder_token {args.placeholder_token!r} contains white space; use one word such as <cat-toy>")
    if not args.initializer_token or not args.initializer_token.strip():
        raise UserError('--initializer_token is empty; give an existing word close to the concept, '
                        'e.g. --initializer_token="toy"')
    positive = {
        "num_vectors": args.num_vectors, "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "repeats": args.repeats,
        "resolution": args.resolution, "num_train_epochs": args.num_train_epochs,
        "num_validation_images": args.num_validation_images, "lr_num_cycles": args.lr_num_cycles,
        "logging_steps": args.logging_steps,
    }
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UserError(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    if args.resolution % 8:
        lower, upper = args.resolution // 8 * 8, args.resolution // 8 * 8 + 8
        raise UserError(f"--resolution {args.resolution} is not a multiple of 8; use {lower or 8} or {upper}")
    # 0 is allowed (it exports the initializer's embedding, as in diffusers); nan fails both comparisons;
    # near float32's limit (3.4e38) AdamW's step size overflows with a traceback.
    if not 0 <= args.learning_rate <= 1e30:
        raise UserError(f"--learning_rate must be 0 or more and at most 1e30, got {args.learning_rate} "
                        "(typical values: 5e-4 to 5e-3)")
    if args.lr_scheduler == "polynomial" and 0 < args.learning_rate <= 1e-7:
        raise UserError(f"--lr_scheduler polynomial decays to 1e-7 and needs a --learning_rate above it, got "
                        f"{args.learning_rate}; raise the rate or pick another --lr_scheduler")
    if args.lr_warmup_steps < 0:
        raise UserError(f"--lr_warmup_steps must be 0 or more, got {args.lr_warmup_steps}")
    if args.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")
    for name in ("save_steps", "checkpointing_steps", "validation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 (off) or more, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UserError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if not (0.0 <= args.adam_beta1 < 1.0 and 0.0 <= args.adam_beta2 < 1.0):
        raise UserError("--adam_beta1 and --adam_beta2 must be in [0, 1)")
    if args.report_to not in ("tensorboard", "wandb", "comet_ml", "all", "none"):
        raise UserError(f"--report_to {args.report_to!r} is unknown; use tensorboard, wandb, comet_ml, all or none")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise UserError("--hub_token with --report_to=wandb would expose the token to wandb; log in with `hf auth login` instead")
    formats = [f.strip() for f in args.export_formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"--export_formats: unknown format(s) {', '.join(unknown)}; choose from {','.join(EXPORT_FORMATS)}")
    args.export_formats = formats
    if args.validation_epochs is not None and args.validation_epochs < 1:
        raise UserError(f"--validation_epochs must be at least 1, got {args.validation_epochs}")
    check_bucket_and_mask_args(args)
    check_validation_args(args)
    evaluate.check_scoring_args(args)
    best.check_select_args(args.select_best, has_scores=bool(args.eval_clip_model),
                           has_loss=args.validation_split is not None or bool(args.validation_data_dir),
                           has_steps=bool(args.save_steps))
    controls.check_args(args)
    flow_matching.check_args(args)
    return args


def check_validation_args(args):
    """--validation_split / --validation_data_dir / --validate_every_n_steps (README "Which step is the good one?")."""
    split, folder = args.validation_split, args.validation_data_dir
    if split is not None and folder:
        raise UserError("--validation_split holds out part of --train_data_dir, --validation_data_dir takes another "
                        "folder; pass one of them")
    if split is not None and not 0.0 < split < 1.0:
        raise UserError(f"--validation_split is the fraction of images held out, between 0 and 1 (e.g. 0.2), got {split}")
    if folder is not None and not os.path.isdir(folder):
        raise UserError(f"--validation_data_dir {folder!r} is not a folder; give a folder of images of the concept")
    if folder and os.path.realpath(folder) == os.path.realpath(args.train_data_dir or ""):
        raise UserError("--validation_data_dir is --train_data_dir itself: the loss would be measured on training "
                        "images; use --validation_split to hold some out, or a folder of other images")
    if args.validate_every_n_steps is not None:
        if args.validate_every_n_steps < 1:
            raise UserError(f"--validate_every_n_steps must be at least 1, got {args.validate_every_n_steps}")
        if split is None and not folder:
            raise UserError("--validate_every_n_steps measures the loss on held-out images; add --validation_split "
                            "0.2 (or --validation_data_dir DIR)")


def check_bucket_and_mask_args(args):
    """--enable_bucket, --random_crop and the masked-loss flags (README "Aspect-ratio buckets", "Masked loss")."""
    if args.random_crop and args.center_crop:
        raise UserError("--random_crop and --center_crop ask for two different crops; pass one of them")
    if args.enable_bucket:
        step, low, high = args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso
        if step < 8 or step % 8:
            raise UserError(f"--bucket_reso_steps must be a positive multiple of 8 (the VAE's factor), got {step}; "
                            "64 is kohya's default")
        for name, value in (("min_bucket_reso", low), ("max_bucket_reso", high)):
            if value < step or value % step:
                raise UserError(f"--{name} {value} is not a multiple of --bucket_reso_steps {step}; use "
                                f"{max(step, value // step * step)}")
        if not low <= args.resolution <= high:
            raise UserError(f"--resolution {args.resolution} is outside the bucket sides --min_bucket_reso {low} to "
                            f"--max_bucket_reso {high}; set them around it (e.g. {max(step, args.resolution // 2 // step * step)}"
                            f" and {args.resolution * 2 // step * step})")
    # As kohya: --alpha_mask masks the loss by itself, and --masked_loss --alpha_mask is its documented pairing.
    # Mask files and alpha are two sources for each image's one mask: kohya silently takes the files then; we ask.
    if args.mask_dir and args.alpha_mask:
        raise UserError("--mask_dir and --alpha_mask are two sources for each image's mask; pass one of them "
                        "(--masked_loss --mask_dir DIR for mask files, --alpha_mask for the images' transparency)")
    if args.masked_loss and not (args.mask_dir or args.alpha_mask):
        raise UserError("--masked_loss needs its masks: --mask_dir DIR (one mask image per training image) "
                        "or --alpha_mask (the images' transparency)")
    if args.mask_dir and not args.masked_loss:
        raise UserError("--mask_dir is only read with --masked_loss; add --masked_loss")


def parse_args(argv=None, prog=None, description=None):
    parser = build_parser(prog=prog, description=description)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return check_args(args)


def flag_names(parser=None):
    """Every long flag of the shared parser, sorted (tests compare the two scripts' --help with it)."""
    parser = parser or build_parser()
    names = set()
    for action in parser._actions:
        names.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
    return sorted(names)


def public_config(args):
    """The run's settings for logs, trackers and model cards: secrets removed."""
    return {k: v for k, v in vars(args).items() if k not in ("hub_token",) and not k.startswith("_")}
