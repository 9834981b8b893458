"""The flow-matching objective of SD3/SD3.5 and Flux.1, as diffusers' train_dreambooth_lora_sd3.py / _flux.py compute it
(textual_inversion_core.flow_matching has the formulas and the flags): noisy = (1 - sigma) x0 + sigma noise, the
transformer predicts noise - x0, the MSE is weighted per example by --weighting_scheme.

Each example's posterior sample, noise and u (which picks its sigma) come from its own generator, in that order, so
a resumed run and N processes equal one uninterrupted process."""

import dataclasses
import math

import torch
import torch.nn.functional as F

from textual_inversion_core import flow_matching as reference

from .model import DeviceBatch, example_generators, masked_mse_per_example, text_and_mask_inputs


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """The flow flags of a run, diffusers' defaults filled in (the family's for the scheme)."""

    weighting_scheme: str
    logit_mean: float = reference.LOGIT_MEAN
    logit_std: float = reference.LOGIT_STD
    mode_scale: float = reference.MODE_SCALE


def settings_from_args(args, default_scheme):
    def pick(value, default):
        return default if value is None else value

    return FlowSettings(pick(args.weighting_scheme, default_scheme), pick(args.logit_mean, reference.LOGIT_MEAN),
                        pick(args.logit_std, reference.LOGIT_STD), pick(args.mode_scale, reference.MODE_SCALE))


def draw_u(generator, settings):
    """u in [0, 1] of one example from its generator: compute_density_for_timestep_sampling's formulas, one draw."""
    if settings.weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.randn((1,), generator=generator) * settings.logit_std + settings.logit_mean)
    u = torch.rand((1,), generator=generator)
    if settings.weighting_scheme == "mode":
        u = 1 - u - settings.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def schedule_points(noise_scheduler, u):
    """(timesteps, sigmas) of the scheduler at index floor(u * num_train_timesteps) (diffusers' training scripts; the
    index is kept inside the table: mode sampling gives u = 1 for a uniform draw of 0)."""
    count = noise_scheduler.config.num_train_timesteps
    index = (u * count).long().clamp(0, count - 1)
    return noise_scheduler.timesteps[index], noise_scheduler.sigmas[index].float()


def device_batch(batch, micro, prompt_ids, settings, noise_scheduler, vae_config, device):
    """Micro-batch `micro` of a core host_batch as a DeviceBatch: latents shifted and scaled by the VAE's
    shift_factor / scaling_factor, noise, the scheduler's timesteps and sigmas of each example's u."""
    latent_shape = tuple(batch["mean"].shape[2:])
    draws = example_generators(batch, micro)
    eps = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    u = torch.cat([draw_u(g, settings) for g in draws])
    timesteps, sigmas = schedule_points(noise_scheduler, u)
    mean, std = torch.from_numpy(batch["mean"][micro]), torch.from_numpy(batch["std"][micro])
    shift = vae_config.shift_factor or 0.0
    latents = ((mean + std * eps) - shift) * vae_config.scaling_factor
    rows, ids, _, mask = text_and_mask_inputs(batch, micro, prompt_ids, device, False)
    return DeviceBatch(latents.to(device), noise.to(device), timesteps.to(device), ids, None, mask, rows,
                       sigmas.to(device))


def loss_weights(scheme, sigmas):
    """Per-example weights [B] (compute_loss_weighting_for_sd3's formulas)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def noisy_input(latents, noise, sigmas):
    """(1 - sigma) x0 + sigma noise, sigma broadcast over each example."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def flow_loss(prediction, latents, noise, sigmas, scheme, mask=None):
    """The weighted flow-matching MSE against the velocity noise - x0, in fp32: the mean over examples of each
    example's (masked) MSE times its weight. Unweighted and unmasked it is the plain MSE."""
    target = noise.float() - latents.float()
    if mask is not None:
        per_example = masked_mse_per_example(prediction, target, mask)
    else:
        per_example = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
    return (per_example * loss_weights(scheme, sigmas)).mean()
