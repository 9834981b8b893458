"""Loading the models, the placeholder embedding, the objective and one optimizer step (PyTorch)."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from textual_inversion_core.errors import UserError


class PlaceholderEmbedding(nn.Module):
    """The text encoder's token embedding with the placeholder rows taken from a small parameter.

    The full matrix stays frozen (and bit-identical); `vectors` [num_vectors, dim] is the only
    trainable tensor, so the optimizer state and the gradient are num_vectors x dim, not 49408 x dim.
    """

    def __init__(self, base, placeholder_ids, init_vectors):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.register_buffer("placeholder_ids", torch.tensor(placeholder_ids, dtype=torch.long, device=device),
                             persistent=False)
        self.vectors = nn.Parameter(init_vectors.detach().to(device=device, dtype=torch.float32, copy=True))

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


# The two model families: SD-1.x/2.x (one CLIP text encoder) and SDXL (CLIP-L plus OpenCLIP bigG with projection).
TEXT_ENCODER_FOLDERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
TOKENIZER_FOLDERS = {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}


def model_family(args):
    """"sdxl" when the pipeline has a second text encoder (model_index.json names text_encoder_2), else "sd"."""
    from diffusers import DiffusionPipeline

    model = args.pretrained_model_name_or_path
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        return "sdxl" if os.path.isdir(os.path.join(model, "text_encoder_2")) else "sd"
    config = DiffusionPipeline.load_config(model, revision=args.revision)
    return "sdxl" if config.get("text_encoder_2", [None])[0] else "sd"


class Models:
    """What training reads: the family, its tokenizers and text encoders (one or two), the VAE, the UNet and
    the noise scheduler."""

    def __init__(self, family, tokenizers, text_encoders, vae, unet, noise_scheduler):
        self.family, self.tokenizers, self.text_encoders = family, tokenizers, text_encoders
        self.vae, self.unet, self.noise_scheduler = vae, unet, noise_scheduler


def load_models(args):
    """The models of --pretrained_model_name_or_path (an SD-1.x/2.x or an SDXL pipeline)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from textual_inversion_core.tokenizer_files import load_clip_tokenizer

    model = args.pretrained_model_name_or_path
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")) \
            and not os.path.isdir(os.path.join(model, "unet")):
        raise UserError(f"--pretrained_model_name_or_path {model!r} is not a Stable Diffusion pipeline folder "
                        "(no model_index.json or unet/); point it at the folder that holds unet/, vae/, text_encoder/")
    common = dict(revision=args.revision)
    try:
        family = model_family(args)
        tokenizers = []
        for i, folder in enumerate(TOKENIZER_FOLDERS[family]):
            if args.tokenizer_name and i == 0:  # --tokenizer_name replaces the first tokenizer, as in diffusers
                tokenizers.append(load_clip_tokenizer(args.tokenizer_name, **common))
            else:
                tokenizers.append(load_clip_tokenizer(model, subfolder=folder, **common))
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **common)
        text_encoders = [load_text_encoder(args, folder) for folder in TEXT_ENCODER_FOLDERS[family]]
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant=args.variant, **common)
    except (OSError, ValueError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model {model!r} ({first}); check the path or hub id, --revision and --variant") from err
    return Models(family, tokenizers, text_encoders, vae, unet, noise_scheduler)


def enable_xformers_attention(models):
    """--enable_xformers_memory_efficient_attention: xFormers attention in the UNet, as diffusers' script, and in
    the VAE. Validation's pipeline is built from these same modules, so it samples with xFormers too; the VAE is
    switched here, once, rather than by the first validation round, so that posteriors cached before and after it
    (and those of a resumed run) come from the same attention. textual_inversion.check_xformers has refused a
    machine without xformers or CUDA before anything loaded; what is left is a broken xformers build."""
    for module in (models.unet, models.vae):
        try:
            module.enable_xformers_memory_efficient_attention()
        except Exception as err:  # xformers' own check (diffusers runs one small attention op) failed
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"--enable_xformers_memory_efficient_attention: xformers does not run here ({first}); "
                            "install the xformers build that matches your torch and CUDA, or drop the flag") from err


def load_text_encoder(args, folder="text_encoder"):
    """A text encoder of the model (CLIPTextModel, or for SDXL's text_encoder_2 CLIPTextModelWithProjection),
    checked to hold its own weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = args.pretrained_model_name_or_path
    cls = CLIPTextModelWithProjection if folder == "text_encoder_2" else CLIPTextModel
    text_encoder = cls.from_pretrained(model, subfolder=folder, variant=args.variant, revision=args.revision)
    if os.path.isdir(model):
        verify_text_encoder_loaded(text_encoder, model, folder)
    return text_encoder


def verify_text_encoder_loaded(text_encoder, model_path, subfolder="text_encoder"):
    """Guard against the transformers-4/5 key-prefix trap: the loaded embedding must be the file's."""
    folder = os.path.join(model_path, subfolder)
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
    even before the learned rows are written in. Call it after moving the text encoder to its device and
    dtype: the vectors are created there in fp32 from start_vectors, exactly (a later .to(dtype) of the
    text encoder would round them). Returns the PlaceholderEmbedding."""
    text_encoder.resize_token_embeddings(num_tokens, mean_resizing=False)  # new rows are overwritten below
    text_encoder.requires_grad_(False)
    base = text_encoder.get_input_embeddings()
    start = torch.as_tensor(np.asarray(start_vectors, np.float32))
    with torch.no_grad():
        base.weight[placeholder_ids] = start.to(base.weight.device, base.weight.dtype)
    embedding = PlaceholderEmbedding(base, placeholder_ids, start)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def denoising_loss(text_encoder, unet, noise_scheduler, latents, noise, timesteps, input_ids, weight_dtype, mask=None):
    """The Textual Inversion objective of an SD-1.x/2.x model (one text encoder, its last hidden state)."""
    encoder_hidden_states = text_encoder(input_ids)[0]
    return prediction_loss(unet, noise_scheduler, latents, noise, timesteps, encoder_hidden_states, None, weight_dtype,
                           mask)


def sdxl_conditioning(text_encoders, input_ids, time_ids):
    """SDXL's UNet inputs from the prompt: both encoders' penultimate hidden states side by side, and
    text_encoder_2's pooled projection with the micro-conditioning time_ids (original size, crop
    top-left, target size), as SDXL was trained."""
    first = text_encoders[0](input_ids[0], output_hidden_states=True)
    second = text_encoders[1](input_ids[1], output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, {"text_embeds": second.text_embeds, "time_ids": time_ids}


def masked_mse(prediction, target, mask):
    """The masked loss: per example, the mean squared error weighted by mask [batch, 1, h, w] (broadcast over
    the latent channels), sum(w * err^2) / sum(w); then the mean over examples. Each example is normalised by
    its own weights, so N processes (each averaging its examples) still equal one. A weight of 0 gives that
    latent pixel no gradient; an all-zero mask makes the example's loss 0. All-ones equals F.mse_loss."""
    return masked_mse_per_example(prediction, target, mask).mean()


def masked_mse_per_example(prediction, target, mask):
    """masked_mse before the mean over examples: [batch]."""
    weights = mask.float().expand_as(prediction)
    error = (prediction.float() - target.float()) ** 2
    return (weights * error).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1e-12)


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


def batch_loss(models, batch, weight_dtype, snr_gamma=None):
    """The loss of one device micro-batch (see device_batch) for either family."""
    latents, noise, timesteps, ids, time_ids, mask = batch
    if models.family == "sdxl":
        hidden, added = sdxl_conditioning(models.text_encoders, ids, time_ids)
    else:
        hidden, added = models.text_encoders[0](ids[0])[0], None
    return prediction_loss(models.unet, models.noise_scheduler, latents, noise, timesteps, hidden, added, weight_dtype,
                           mask, snr_gamma)


def device_batch(batch, micro, prompt_ids, timestep_range, scaling_factor, device, noise_offset=0.0):
    """Micro-batch `micro` of a core host_batch as tensors: (latents, noise, timesteps, input_ids per
    tokenizer, SDXL time_ids or None, loss mask or None). prompt_ids: one [num_prompts, 77] tensor per tokenizer.
    The latent shape is the batch's own (with buckets, its bucket's). timestep_range: (low, high), timesteps
    uniform in [low, high).

    Each example's posterior sample, noise and timestep come from its own generator (seeded by its
    global index), so they do not depend on how examples are split over processes. With noise_offset
    (--noise_offset) the noise of each example gets noise_offset x randn(channels, 1, 1), drawn after those
    from the same generator (the draws before it are unchanged)."""
    low, high = timestep_range
    latent_shape = tuple(batch["mean"].shape[2:])
    draws = [torch.Generator().manual_seed(int(s)) for s in batch["noise_seed"][micro]]
    eps = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in draws])
    timesteps = torch.cat([torch.randint(low, high, (1,), generator=g) for g in draws])
    if noise_offset:
        offsets = torch.stack([torch.randn((latent_shape[0], 1, 1), generator=g) for g in draws])
        noise = noise + noise_offset * offsets
    mean, std = torch.from_numpy(batch["mean"][micro]), torch.from_numpy(batch["std"][micro])
    latents = (mean + std * eps) * scaling_factor
    rows = torch.from_numpy(batch["prompt"][micro])
    ids = [table[rows].to(device) for table in prompt_ids]
    time_ids = torch.from_numpy(batch["time_ids"][micro]).to(device) if len(prompt_ids) > 1 else None
    mask = torch.from_numpy(batch["mask"][micro]).to(device) if "mask" in batch else None
    return latents.to(device), noise.to(device), timesteps.to(device), ids, time_ids, mask


def held_out_loss(accelerator, models, weight_dtype, scaling_factor, device):
    """loss_of(batch, prompt_ids) -> float for textual_inversion_core.validation: the plain loss (batch_loss, no
    min-SNR weights, no noise offset) of a held-out batch with the current vectors, under the run's autocast. The
    posterior sample and noise are the example's keyed draws (device_batch); the timestep is the batch's fixed one."""

    def loss_of(batch, prompt_ids):
        tables = [torch.from_numpy(ids) for ids in prompt_ids]
        latents, noise, _, ids, time_ids, mask = device_batch(batch, 0, tables, (0, 1), scaling_factor, device)
        timesteps = torch.from_numpy(batch["timestep"][0]).to(device)
        with torch.no_grad(), accelerator.autocast():
            return float(batch_loss(models, (latents, noise, timesteps, ids, time_ids, mask), weight_dtype))

    return loss_of


def train_step(accelerator, models, optimizer, vector_sets, micro_batches, lr, weight_dtype, controls=None,
               norm_targets=None):
    """One optimizer step of the vector sets over the micro-batches; returns (mean loss, [mean L2 norm of each
    set's vectors after the step]), left on the device.

    Gradients are averaged over the micro-batches, then over processes, so N processes x B equal one
    process x N*B. controls (textual_inversion_core.controls.Controls): --snr_gamma weights the loss, and the
    norm control (--preserve_embedding_norm to norm_targets, one [num_vectors] array per set, or
    --max_embedding_norm) rescales the vectors after the optimizer's update."""
    snr_gamma = controls.snr_gamma if controls is not None else None
    for group in optimizer.param_groups:
        group["lr"] = lr
    count = len(micro_batches)
    step_loss = torch.zeros((), device=vector_sets[0].device)
    for batch in micro_batches:
        with accelerator.autocast():
            loss = batch_loss(models, batch, weight_dtype, snr_gamma)
        accelerator.backward(loss / count)
        step_loss += loss.detach() / count
    if accelerator.num_processes > 1:
        for vectors in vector_sets:
            torch.distributed.all_reduce(vectors.grad)
            vectors.grad /= accelerator.num_processes
        step_loss = accelerator.reduce(step_loss, reduction="mean")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if controls is not None and controls.norm_mode is not None:
        apply_norm_control(vector_sets, controls.norm_mode, norm_targets, controls.max_norm)
    with torch.no_grad():
        norms = [torch.linalg.vector_norm(v.detach(), dim=1).mean() for v in vector_sets]
    return step_loss, norms


def apply_norm_control(vector_sets, mode, targets=None, max_norm=None):
    """After an optimizer step, in place: "preserve" rescales each vector (row) to its target norm (a zero vector
    stays zero); "cap" scales down the vectors whose norm exceeds max_norm and leaves the others bit-identical.
    textual_inversion_core.controls.apply_norm_control is the reference."""
    with torch.no_grad():
        for i, vectors in enumerate(vector_sets):
            norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            if mode == "preserve":
                target = torch.as_tensor(targets[i], dtype=torch.float32, device=vectors.device).reshape(norms.shape)
                vectors.copy_(torch.where(norms > 0, vectors * (target / safe), vectors))
            elif mode == "cap":
                vectors.copy_(torch.where(norms > max_norm, vectors * (max_norm / safe), vectors))


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
