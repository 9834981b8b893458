"""Loading the models, the placeholder embedding, the objective and one optimizer step (PyTorch)."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from textual_inversion_core.errors import UserError
from textual_inversion_core.run import AdamMoments


class PlaceholderEmbedding(nn.Module):
    """The text encoder's token embedding with the placeholder rows taken from a small parameter.

    The full matrix stays frozen (and bit-identical); `vectors` [num_vectors, dim] is the only
    trainable tensor, so the optimizer state and the gradient are num_vectors x dim, not 49408 x dim.
    """

    def __init__(self, base, placeholder_ids, init_vectors):
        super().__init__()
        self.base = base
        self.register_buffer("placeholder_ids", torch.tensor(placeholder_ids, dtype=torch.long), persistent=False)
        self.vectors = nn.Parameter(init_vectors.detach().clone().float())

    @property
    def weight(self):
        return self.base.weight

    @property
    def num_embeddings(self):
        return self.base.num_embeddings

    @property
    def embedding_dim(self):
        return self.base.embedding_dim

    def forward(self, input_ids):
        out = self.base(input_ids)
        match = input_ids.unsqueeze(-1) == self.placeholder_ids  # [..., num_vectors] one-hot
        picked = match.to(self.vectors.dtype) @ self.vectors  # exact: one 1.0 per row
        return torch.where(match.any(-1, keepdim=True), picked.to(out.dtype), out)


def load_models(args):
    """(tokenizer, noise_scheduler, text_encoder, vae, unet) of --pretrained_model_name_or_path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    model = args.pretrained_model_name_or_path
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")) \
            and not os.path.isdir(os.path.join(model, "unet")):
        raise UserError(f"--pretrained_model_name_or_path {model!r} is not a Stable Diffusion pipeline folder "
                        "(no model_index.json or unet/); point it at the folder that holds unet/, vae/, text_encoder/")
    common = dict(revision=args.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or model,
                                                  subfolder=None if args.tokenizer_name else "tokenizer", **common)
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **common)
        text_encoder = load_text_encoder(args)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant=args.variant, **common)
    except (OSError, ValueError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model {model!r} ({first}); check the path or hub id, --revision and --variant") from err
    return tokenizer, noise_scheduler, text_encoder, vae, unet


def load_text_encoder(args):
    """The model's CLIP text encoder in fp32, checked to hold its own weights."""
    from transformers import CLIPTextModel

    model = args.pretrained_model_name_or_path
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", variant=args.variant,
                                                 revision=args.revision)
    if os.path.isdir(model):
        verify_text_encoder_loaded(text_encoder, model)
    return text_encoder


def verify_text_encoder_loaded(text_encoder, model_path):
    """Guard against the transformers-4/5 key-prefix trap: the loaded embedding must be the file's."""
    folder = os.path.join(model_path, "text_encoder")
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
    if len(files) != 1:
        return
    from safetensors import safe_open

    with safe_open(os.path.join(folder, files[0]), framework="pt") as f:
        key = next((k for k in f.keys() if k.endswith("embeddings.token_embedding.weight")), None)
        if key is None:
            return
        stored = f.get_tensor(key)
    loaded = text_encoder.get_input_embeddings().weight
    if stored.shape != loaded.shape or not torch.equal(stored.to(loaded.dtype), loaded.detach().cpu()):
        raise UserError(f"the text encoder in {folder!r} did not load its own weights (key layout mismatch); "
                        "re-save it with the transformers version in requirements.txt")


def insert_placeholder_embedding(text_encoder, num_tokens, placeholder_ids, start_vectors):
    """Grow the embedding to num_tokens rows and make the placeholder rows the one trainable tensor.

    The new rows of the frozen matrix hold the start vectors too, so a saved text encoder is right
    even before the learned rows are written in. Returns the PlaceholderEmbedding."""
    text_encoder.resize_token_embeddings(num_tokens, mean_resizing=False)  # new rows are overwritten below
    text_encoder.requires_grad_(False)
    base = text_encoder.get_input_embeddings()
    start = torch.as_tensor(np.asarray(start_vectors, np.float32))
    with torch.no_grad():
        base.weight[placeholder_ids] = start.to(base.weight.dtype)
    embedding = PlaceholderEmbedding(base, placeholder_ids, start)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def denoising_loss(text_encoder, unet, noise_scheduler, latents, noise, timesteps, input_ids, weight_dtype):
    """The Textual Inversion objective: MSE between the UNet's prediction and the scheduler's target
    (the noise for epsilon models, the velocity for v_prediction models), computed in fp32."""
    encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=weight_dtype)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps).to(dtype=weight_dtype)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def device_batch(batch, micro, prompt_ids, latent_shape, num_timesteps, scaling_factor, device):
    """Micro-batch `micro` of a core host_batch as tensors: (latents, noise, timesteps, input_ids).

    Each example's posterior sample, noise and timestep come from its own generator (seeded by its
    global index), so they do not depend on how examples are split over processes."""
    draws = [torch.Generator().manual_seed(int(s)) for s in batch["noise_seed"][micro]]
    eps = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in draws])
    mean, std = torch.from_numpy(batch["mean"][micro]), torch.from_numpy(batch["std"][micro])
    latents = (mean + std * eps) * scaling_factor
    ids = prompt_ids[torch.from_numpy(batch["prompt"][micro])]
    return latents.to(device), noise.to(device), timesteps.to(device), ids.to(device)


def train_step(accelerator, models, optimizer, vectors, micro_batches, lr):
    """One optimizer step of the vectors over the micro-batches; returns the mean loss, left on the device.

    models: (text_encoder, unet, noise_scheduler, weight_dtype). Gradients are averaged over the
    micro-batches, then over processes, so N processes x B equal one process x N*B."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    count = len(micro_batches)
    step_loss = torch.zeros((), device=vectors.device)
    for latents, noise, timesteps, ids in micro_batches:
        with accelerator.autocast():
            loss = denoising_loss(*models[:3], latents, noise, timesteps, ids, models[3])
        accelerator.backward(loss / count)
        step_loss += loss.detach() / count
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(vectors.grad)
        vectors.grad /= accelerator.num_processes
        step_loss = accelerator.reduce(step_loss, reduction="mean")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def adam_moments(optimizer):
    """AdamW's state of the vectors (None before the first step)."""
    state = optimizer.state_dict()["state"].get(0)
    if not state:
        return None
    return AdamMoments(state["exp_avg"].float().cpu().numpy(), state["exp_avg_sq"].float().cpu().numpy(),
                       int(float(state["step"])))


def load_adam_moments(optimizer, adam, device):
    state = optimizer.state_dict()
    state["state"] = {0: {"step": torch.tensor(float(adam.step)),
                          "exp_avg": torch.from_numpy(np.asarray(adam.exp_avg)).to(device),
                          "exp_avg_sq": torch.from_numpy(np.asarray(adam.exp_avg_sq)).to(device)}}
    optimizer.load_state_dict(state)


def free_vae_encoder(vae):
    """Every (image, flip) is cached: the encoder half of the VAE is not needed any more."""
    vae.encoder, vae.quant_conv = None, None


def encode_posteriors(vae, device):
    """encode(list of CHW pixel arrays) -> (means, stds) for the core LatentCache."""

    def encode(pixels):
        # Hand the heap pages glibc keeps after a training step back to the OS before the VAE maps
        # its large buffers on top of them (SD-1.5, 512 px: peak RSS 7.39 -> 6.87 GB while the cache fills).
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass
        with torch.no_grad():
            dist = vae.encode(torch.from_numpy(np.stack(pixels)).to(device)).latent_dist
        return ([m.float().cpu().numpy() for m in dist.mean], [s.float().cpu().numpy() for s in dist.std])

    return encode
