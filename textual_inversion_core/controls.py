"""Opt-in training controls both trainers share (README "Training controls"): min-SNR-gamma loss weighting,
noise offset, a timestep range and the embedding-norm controls. Framework-free: the flag checks, the settings
a trainer reads, and numpy reference formulas (the tests hold each backend's version against them).

Without any of the flags every control is off and the trainers run exactly the code they ran before.
"""

import dataclasses
import math

import numpy as np

from . import model_files
from .errors import UserError

NORM_MODES = ("preserve", "cap")


@dataclasses.dataclass(frozen=True)
class Controls:
    """What a trainer does differently from diffusers' Textual Inversion loop (all off by default)."""

    snr_gamma: float = None  # min-SNR-gamma loss weights (None: the plain MSE)
    noise_offset: float = 0.0  # noise += offset * randn(channels, 1, 1) per example (0: off, no extra draw)
    min_timestep: int = 0  # timesteps uniform in [min_timestep, max_timestep)
    max_timestep: int = 1000
    norm_mode: str = None  # None, "preserve" (each vector keeps its start norm) or "cap" (norms at most max_norm)
    max_norm: float = None

    @property
    def timestep_range(self):
        return self.min_timestep, self.max_timestep


def check_args(args):
    """The controls' flags on their own (cli.check_args calls this; the timestep range against the model's
    scheduler is check_timestep_range, once its num_train_timesteps is known)."""
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        raise UserError(f"--snr_gamma must be a positive number, got {args.snr_gamma} (5.0 is the value the "
                        "min-SNR paper and diffusers recommend)")
    if not (math.isfinite(args.noise_offset) and args.noise_offset >= 0):
        raise UserError(f"--noise_offset must be 0 (off) or more, got {args.noise_offset} (kohya and diffusers "
                        "use about 0.05 to 0.1)")
    check_timestep_range(args.min_timestep, args.max_timestep)
    if args.max_embedding_norm is not None and not (math.isfinite(args.max_embedding_norm)
                                                   and args.max_embedding_norm > 0):
        raise UserError(f"--max_embedding_norm must be a positive number, got {args.max_embedding_norm}")
    if args.preserve_embedding_norm and args.max_embedding_norm is not None:
        raise UserError("--preserve_embedding_norm keeps every vector at its start norm, --max_embedding_norm caps "
                        "the norms; pass one of them")


def check_timestep_range(min_timestep, max_timestep, num_train_timesteps=None):
    """--min_timestep/--max_timestep (None: 0 and the scheduler's num_train_timesteps): 0 <= min < max <= num."""
    if min_timestep is not None and min_timestep < 0:
        raise UserError(f"--min_timestep must be 0 or more, got {min_timestep}")
    if max_timestep is not None and max_timestep < 1:
        raise UserError(f"--max_timestep must be at least 1 (timesteps are drawn from [min, max)), got {max_timestep}")
    if min_timestep is not None and max_timestep is not None and min_timestep >= max_timestep:
        raise UserError(f"--min_timestep {min_timestep} must be below --max_timestep {max_timestep} (timesteps are "
                        "drawn from [min, max))")
    if num_train_timesteps is None:
        return
    if max_timestep is not None and max_timestep > num_train_timesteps:
        raise UserError(f"--max_timestep {max_timestep} is above the model's {num_train_timesteps} training timesteps "
                        f"(num_train_timesteps of its scheduler); use at most {num_train_timesteps}")
    if min_timestep is not None and min_timestep >= num_train_timesteps:
        raise UserError(f"--min_timestep {min_timestep} leaves no timestep: the model has {num_train_timesteps} "
                        f"(0 to {num_train_timesteps - 1}); use less")


def scheduler_timesteps(name_or_path, revision=None):
    """num_train_timesteps of the model's scheduler/scheduler_config.json (a local folder or the Hub cache) without
    loading anything; None when it cannot be told yet (the trainer checks again once the scheduler is loaded)."""
    config = model_files.read_json(name_or_path, "scheduler/scheduler_config.json", revision)
    if config is None:
        return None
    try:
        return int(config.get("num_train_timesteps", 1000))
    except (ValueError, TypeError):
        return None


def from_args(args, num_train_timesteps):
    """The Controls of the parsed flags for a model whose scheduler has num_train_timesteps (checked here)."""
    check_timestep_range(args.min_timestep, args.max_timestep, num_train_timesteps)
    mode = "preserve" if args.preserve_embedding_norm else "cap" if args.max_embedding_norm is not None else None
    return Controls(snr_gamma=args.snr_gamma, noise_offset=float(args.noise_offset),
                    min_timestep=args.min_timestep if args.min_timestep is not None else 0,
                    max_timestep=args.max_timestep if args.max_timestep is not None else int(num_train_timesteps),
                    norm_mode=mode, max_norm=args.max_embedding_norm)


# --------------------------------------------------------------------------------------------------
# Reference formulas (numpy): what the backends compute on their devices


def vector_norms(vectors):
    """The L2 norm of each vector (row) of a [num_vectors, dim] array, float32."""
    return np.linalg.norm(np.asarray(vectors, np.float64), axis=-1).astype(np.float32)


def norm_targets(controls, start_sets):
    """Per vector set, what the norm control needs: the start vectors' norms ("preserve": each learned vector is
    rescaled to its start vector's norm after every optimizer step; a resume re-derives them from the same start
    vectors), or None. start_sets: the initializer's (or --init_from's) vectors of each text encoder."""
    if controls.norm_mode != "preserve":
        return None
    return [vector_norms(v) for v in start_sets]


def apply_norm_control(vectors, mode, target=None, max_norm=None):
    """The norm control on one [num_vectors, dim] set, as each backend applies it after an optimizer step.
    preserve: v * (target / |v|) (a zero vector stays zero); cap: v * (max_norm / |v|) where |v| > max_norm,
    the vector untouched otherwise."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    if mode == "preserve":
        target = np.asarray(target, np.float32).reshape(norms.shape)
        return np.where(norms > 0, vectors * (target / np.where(norms > 0, norms, 1)), vectors)
    if mode == "cap":
        return np.where(norms > max_norm, vectors * (np.float32(max_norm) / np.where(norms > 0, norms, 1)), vectors)
    return vectors


def snr(alphas_cumprod, timesteps):
    """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at each timestep, computed as diffusers'
    training_utils.compute_snr does ((sqrt(a) / sqrt(1 - a)) ** 2, float32)."""
    alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
    alpha = np.sqrt(alphas_cumprod)[timesteps]
    sigma = np.sqrt(np.float32(1.0) - alphas_cumprod)[timesteps]
    return (alpha / sigma) ** 2


def min_snr_weights(snr_values, gamma, prediction_type):
    """Min-SNR-gamma weights (Hang et al. 2023) as diffusers' train_text_to_image.py: min(snr, gamma) / snr for
    epsilon models, min(snr, gamma) / (snr + 1) for v_prediction. Where snr is 0 (only with zero-terminal-SNR
    schedules) an epsilon weight is its limit 1 instead of diffusers' 0/0."""
    snr_values = np.asarray(snr_values, np.float32)
    clipped = np.minimum(snr_values, np.float32(gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    return np.where(snr_values > 0, clipped / np.where(snr_values > 0, snr_values, 1), np.float32(1.0))


def weighted_loss(per_example_loss, weights):
    """The step's loss with the weights: mean over examples of (per-example MSE x weight)."""
    return float(np.mean(np.asarray(per_example_loss, np.float32) * np.asarray(weights, np.float32)))


def norm_log_keys(count):
    """Tracker keys of the learned vectors' mean norms: embedding_norm (text_encoder), embedding_norm_2 (SDXL's
    text_encoder_2)."""
    return ["embedding_norm" if i == 0 else f"embedding_norm_{i + 1}" for i in range(count)]
