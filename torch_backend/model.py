"""Loading the models, the placeholder embedding, the objective and one optimizer step (PyTorch)."""

import os
from typing import NamedTuple, Optional

import numpy as np
import torch
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


def enable_xformers_attention(models):
    """--enable_xformers_memory_efficient_attention: xFormers attention in the denoiser, as diffusers' script, and in
    the VAE. Validation's pipeline is built from these same modules, so it samples with xFormers too; the VAE is
    switched here, once, rather than by the first validation round, so that posteriors cached before and after it
    (and those of a resumed run) come from the same attention. textual_inversion.check_xformers has refused a
    machine without xformers or CUDA before anything loaded; what is left is a broken xformers build."""
    for module in (models.denoiser, models.vae):
        try:
            module.enable_xformers_memory_efficient_attention()
        except Exception as err:  # xformers' own check (diffusers runs one small attention op) failed
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"--enable_xformers_memory_efficient_attention: xformers does not run here ({first}); "
                            "install the xformers build that matches your torch and CUDA, or drop the flag") from err


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


def freeze(modules):
    for module in modules:
        module.requires_grad_(False)


def place(text_encoders, device, dtype):
    """The text encoders on the device in the frozen models' dtype, in eval mode."""
    for text_encoder in text_encoders:
        text_encoder.to(device, dtype=dtype)
        text_encoder.eval()


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


class DeviceBatch(NamedTuple):
    """One device micro-batch (a family's device_batch): latents [B, C, h, w] (scaled as the denoiser takes them),
    noise, timesteps, the input ids of each trained text encoder, SDXL's time_ids (else None), the loss mask (else
    None), the prompt rows (which cached outputs of a frozen encoder belong to the examples) and, for flow
    matching, the sigmas [B] (else None)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    ids: list
    time_ids: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    rows: Optional[torch.Tensor] = None
    sigmas: Optional[torch.Tensor] = None


def text_and_mask_inputs(batch, micro, prompt_ids, device, with_time_ids):
    """(rows, ids per trained encoder, time_ids or None, mask or None) of micro-batch `micro` of a host_batch."""
    rows = torch.from_numpy(batch["prompt"][micro])
    ids = [table[rows].to(device) for table in prompt_ids]
    time_ids = torch.from_numpy(batch["time_ids"][micro]).to(device) if with_time_ids else None
    mask = torch.from_numpy(batch["mask"][micro]).to(device) if "mask" in batch else None
    return rows, ids, time_ids, mask


def example_generators(batch, micro):
    """One generator per example of the micro-batch, seeded by its noise_seed (its global index): every random draw
    of an example comes from it, so draws do not depend on how examples are split over processes or on a resume."""
    return [torch.Generator().manual_seed(int(s)) for s in batch["noise_seed"][micro]]


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


def held_out_loss(accelerator, family, models, weight_dtype, device):
    """loss_of(batch, prompt_ids) -> float for textual_inversion_core.validation: the plain loss (the family's
    batch_loss, no min-SNR weights, no noise offset) of a held-out batch with the current vectors, under the run's
    autocast. The posterior sample and noise are the example's keyed draws; the timestep is the batch's fixed one
    (family.held_out_batch)."""

    def loss_of(batch, prompt_ids):
        tables = [torch.from_numpy(ids) for ids in prompt_ids]
        micro = family.held_out_batch(batch, tables, models, device)
        with torch.no_grad(), accelerator.autocast():
            return float(family.batch_loss(models, micro, weight_dtype))

    return loss_of


def train_step(accelerator, models, optimizer, vector_sets, micro_batches, lr, weight_dtype, controls=None,
               norm_targets=None):
    """One optimizer step of the vector sets over the micro-batches; returns (mean loss, [mean L2 norm of each
    set's vectors after the step]), left on the device.

    Gradients are averaged over the micro-batches, then over processes, so N processes x B equal one
    process x N*B. controls (textual_inversion_core.controls.Controls): --snr_gamma weights the loss, and the
    norm control (--preserve_embedding_norm to norm_targets, one [num_vectors] array per set, or
    --max_embedding_norm) rescales the vectors after the optimizer's update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    count = len(micro_batches)
    step_loss = torch.zeros((), device=vector_sets[0].device)
    for batch in micro_batches:
        with accelerator.autocast():
            loss = models.family.batch_loss(models, batch, weight_dtype, controls)
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
