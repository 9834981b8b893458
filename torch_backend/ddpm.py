"""The DDPM objective of SD-1.x/2.x and SDXL (diffusers' textual_inversion scripts): each example's posterior sample,
noise and timestep from its own generator, the UNet's epsilon or v prediction, min-SNR-gamma weights."""

import torch
import torch.nn.functional as F

from .model import DeviceBatch, example_generators, masked_mse_per_example, text_and_mask_inputs


def denoising_loss(text_encoder, unet, noise_scheduler, latents, noise, timesteps, input_ids, weight_dtype, mask=None):
    """The Textual Inversion objective of an SD-1.x/2.x model (one text encoder, its last hidden state)."""
    encoder_hidden_states = text_encoder(input_ids)[0]
    return prediction_loss(unet, noise_scheduler, latents, noise, timesteps, encoder_hidden_states, None, weight_dtype,
                           mask)


def compute_snr(noise_scheduler, timesteps):
    """SNR(t) = alphas_cumprod / (1 - alphas_cumprod) at each timestep, as diffusers.training_utils.compute_snr."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device)
    alpha = (alphas_cumprod ** 0.5)[timesteps].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5)[timesteps].float()
    return (alpha / sigma) ** 2


def min_snr_weights(noise_scheduler, timesteps, gamma):
    """Min-SNR-gamma weights [batch] as diffusers' train_text_to_image.py: min(SNR, gamma) / SNR for epsilon
    models, / (SNR + 1) for v_prediction (textual_inversion_core.controls.min_snr_weights is the reference;
    an epsilon weight at SNR 0, only met with zero-terminal-SNR schedules, is its limit 1)."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / torch.where(snr > 0, snr, torch.ones_like(snr)), torch.ones_like(snr))


def prediction_loss(unet, noise_scheduler, latents, noise, timesteps, encoder_hidden_states, added_cond_kwargs,
                    weight_dtype, mask=None, snr_gamma=None):
    """MSE between the UNet's prediction and the scheduler's target (the noise for epsilon models, the
    velocity for v_prediction models), computed in fp32; weighted per latent pixel when mask is given.
    With snr_gamma (--snr_gamma) each example's MSE is weighted by its min-SNR-gamma weight before the mean
    over examples, as in diffusers' train_text_to_image.py."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps).to(dtype=weight_dtype)
    if added_cond_kwargs is not None:
        added_cond_kwargs = {k: v.to(dtype=weight_dtype) for k, v in added_cond_kwargs.items()}
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states.to(dtype=weight_dtype),
                      added_cond_kwargs=added_cond_kwargs).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if mask is None and snr_gamma is None:  # diffusers' loss, computed exactly as there
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if mask is not None:
        per_example = masked_mse_per_example(model_pred, target, mask)
    else:
        per_example = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        per_example = per_example.mean(dim=list(range(1, per_example.ndim)))
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return per_example.mean()


def device_batch(batch, micro, prompt_ids, timestep_range, scaling_factor, device, noise_offset=0.0,
                 with_time_ids=None):
    """Micro-batch `micro` of a core host_batch as a DeviceBatch (latents, noise, timesteps, input_ids per
    tokenizer, SDXL time_ids (with_time_ids; default: with more than one tokenizer) or None, loss mask or None,
    prompt rows). prompt_ids: one [num_prompts, 77] tensor per tokenizer. The latent shape is the batch's own
    (with buckets, its bucket's). timestep_range: (low, high), timesteps uniform in [low, high).

    Each example's posterior sample, noise and timestep come from its own generator (seeded by its
    global index), so they do not depend on how examples are split over processes. With noise_offset
    (--noise_offset) the noise of each example gets noise_offset x randn(channels, 1, 1), drawn after those
    from the same generator (the draws before it are unchanged)."""
    low, high = timestep_range
    latent_shape = tuple(batch["mean"].shape[2:])
    draws = example_generators(batch, micro)
    eps = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    timesteps = torch.cat([torch.randint(low, high, (1,), generator=g) for g in draws])
    if noise_offset:
        offsets = torch.stack([torch.randn((latent_shape[0], 1, 1), generator=g) for g in draws])
        noise = noise + noise_offset * offsets
    mean, std = torch.from_numpy(batch["mean"][micro]), torch.from_numpy(batch["std"][micro])
    latents = (mean + std * eps) * scaling_factor
    rows, ids, time_ids, mask = text_and_mask_inputs(batch, micro, prompt_ids, device,
                                                     len(prompt_ids) > 1 if with_time_ids is None else with_time_ids)
    return DeviceBatch(latents.to(device), noise.to(device), timesteps.to(device), ids, time_ids, mask, rows)
