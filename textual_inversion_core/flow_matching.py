"""Flow matching (SD3/SD3.5, Flux.1) as diffusers' train_dreambooth_lora_sd3.py / _flux.py train it, framework-free:
the flags' checks, which flags mean something for which family, and numpy reference formulas (the tests hold the
PyTorch code and diffusers.training_utils against them).

A flow model sees noisy = (1 - sigma) * x0 + sigma * noise and predicts the velocity noise - x0. sigma is the
scheduler's sigma at index floor(u * num_train_timesteps), u drawn by --weighting_scheme: logit_normal
(sigmoid of N(logit_mean, logit_std)), mode (SD3 paper's mode sampling with mode_scale), otherwise uniform; the
loss of each example is weighted by sigma^-2 (sigma_sqrt), 2 / (pi (1 - 2 sigma + 2 sigma^2)) (cosmap), or 1.
"""

import math

import numpy as np

from .errors import UserError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
# diffusers' defaults for the flags we take from its scripts (None on the command line: not given).
LOGIT_MEAN, LOGIT_STD, MODE_SCALE, GUIDANCE_SCALE = 0.0, 1.0, 1.29, 3.5
FLOW_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")
T5_FLAGS = ("enable_t5_ti", "max_sequence_length")
# DDPM-only controls: they have no flow-matching meaning here and are refused on a flow model.
DDPM_FLAGS = ("snr_gamma", "noise_offset", "min_timestep", "max_timestep")


def _given(args, name):
    value = getattr(args, name, None)
    return value not in (None, False) and not (name == "noise_offset" and value == 0)


def check_args(args):
    """The flow flags on their own (cli.check_args calls this)."""
    if args.logit_std is not None and not (math.isfinite(args.logit_std) and args.logit_std > 0):
        raise UserError(f"--logit_std must be a positive number, got {args.logit_std} (diffusers' default is 1.0)")
    for name in ("logit_mean", "mode_scale", "guidance_scale"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise UserError(f"--max_sequence_length must be at least 1, got {args.max_sequence_length}")


def check_for_family(args, spec):
    """Flags that mean nothing for this family (a FamilySpec), one line each, before any model loads."""
    if not spec.has_t5:
        for name in T5_FLAGS:
            if _given(args, name):
                raise UserError(f"--{name} is for models with a T5 text encoder (SD3, Flux.1); {spec.label} has none: "
                                "drop the flag")
    if spec.flow_matching:
        if getattr(args, "validation_prompt", None):
            raise UserError(f"--validation_prompt: this trainer does not sample {spec.label} images during training yet; "
                            "drop the flag and try the embedding after training (README \"SD3/SD3.5 and Flux.1\")")
        for flag, given in (("--validation_split / --validation_data_dir",
                             getattr(args, "validation_split", None) is not None
                             or getattr(args, "validation_data_dir", None)),
                            ("--eval_clip_model", getattr(args, "eval_clip_model", None))):
            if given:
                raise UserError(f"{flag}: this trainer does not score {spec.label} steps yet (only SD-1.x/2.x and "
                                "SDXL); drop the flag and compare the saved steps' files after training")
        for name in DDPM_FLAGS:
            if _given(args, name):
                raise UserError(f"--{name} is a DDPM control; {spec.label} trains with flow matching, where it has no "
                                "meaning here: drop it (--weighting_scheme chooses how sigmas are drawn and weighted)")
    else:
        for name in FLOW_FLAGS:
            if _given(args, name):
                raise UserError(f"--{name} is a flow-matching flag (SD3, Flux.1); {spec.label} trains with DDPM noise "
                                "prediction: drop it")


# --------------------------------------------------------------------------------------------------
# Reference formulas (numpy)


def density_u(scheme, normal=None, uniform=None, logit_mean=LOGIT_MEAN, logit_std=LOGIT_STD, mode_scale=MODE_SCALE):
    """u in [0, 1] of each example from its standard-normal draw (logit_normal) or uniform draw (the others), as
    diffusers.training_utils.compute_density_for_timestep_sampling."""
    if scheme == "logit_normal":
        return 1.0 / (1.0 + np.exp(-(np.asarray(normal, np.float64) * logit_std + logit_mean)))
    u = np.asarray(uniform, np.float64)
    if scheme == "mode":
        return 1.0 - u - mode_scale * (np.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def loss_weights(scheme, sigmas):
    """Per-example loss weights, as diffusers.training_utils.compute_loss_weighting_for_sd3."""
    sigmas = np.asarray(sigmas, np.float64)
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas ** 2))
    return np.ones_like(sigmas)
