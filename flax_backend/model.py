"""The Flax objective, the train state and the pure train step.

Only the placeholder vectors are differentiated: they are the one argument of the gradient, and are
written into the token-embedding lookup's output, so neither the 49408-row matrix nor any other
weight gets a gradient. The loss is shared with the parity test, which feeds it the PyTorch loss's
exact inputs.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from textual_inversion_core.run import AdamMoments


@flax.struct.dataclass
class TrainState:
    """Everything training changes: the vector sets (one per text encoder), AdamW's state and the step."""

    vectors: tuple  # ([num_vectors, dim] float32, ...): text_encoder's, then SDXL's text_encoder_2's
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar


def placeholder_interceptor(placeholder_ids, vectors):
    """Flax method interceptor: the token-embedding lookup returns `vectors` for the placeholder ids.

    A one-hot product (exact: one 1.0 per row) selects the vector, as in the PyTorch script, so the
    gradient flows into `vectors` only; the frozen matrix is a constant of the computation.
    """

    ids = jnp.asarray(placeholder_ids, dtype=jnp.int32)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Embed) \
                and context.module.name == "token_embedding":
            match = args[0][..., None] == ids
            picked = match.astype(vectors.dtype) @ vectors
            out = jnp.where(match.any(-1, keepdims=True), picked.astype(out.dtype), out)
        return out

    return interceptor


def exact_gelu_interceptor(next_fun, args, kwargs, context):
    """diffusers' Flax GEGLU uses the tanh approximation of GELU; the PyTorch UNet (which the weights
    were trained with) uses the exact erf form. Run the exact one, so both trainers optimise the
    same function (dropout is 0 and off: the UNet is frozen and deterministic)."""
    if context.method_name == "__call__" and type(context.module).__name__ == "FlaxGEGLU":
        hidden_linear, hidden_gate = jnp.split(context.module.proj(args[0]), 2, axis=2)
        return hidden_linear * jax.nn.gelu(hidden_gate, approximate=False)
    return next_fun(*args, **kwargs)


def make_denoising_loss(text_encoders, unet, noise_scheduler, placeholder_id_sets, weight_dtype, snr_gamma=None):
    """loss(vector_sets, params, scheduler_state, latents, noise, timesteps, input_id_sets, time_ids) -> fp32 scalar.

    One text encoder (SD-1.x/2.x): its last hidden state conditions the UNet. Two (SDXL): both penultimate
    hidden states side by side, plus text_encoder_2's pooled projection and the time_ids (original size,
    crop top-left, target size). params = {"text_encoder": ..., ["text_encoder_2": ...,] "unet": ...}.
    MSE between the UNet's prediction and the target (noise for epsilon models, velocity for v_prediction
    models), as torch_backend.ddpm.prediction_loss; with snr_gamma (--snr_gamma) each example's MSE is weighted
    by its min-SNR-gamma weight before the mean over examples (diffusers' train_text_to_image.py).
    """
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    names = ("text_encoder", "text_encoder_2")[: len(text_encoders)]

    def encode(vector_sets, params, input_id_sets):
        outputs = []
        for name, text_encoder, ids, vectors, placeholder_ids in zip(names, text_encoders, input_id_sets, vector_sets,
                                                                     placeholder_id_sets):
            with nn.intercept_methods(placeholder_interceptor(placeholder_ids, vectors)):
                outputs.append(text_encoder(ids, params=params[name], output_hidden_states=len(names) > 1))
        if len(outputs) == 1:
            return outputs[0][0], None
        hidden = jnp.concatenate([outputs[0].hidden_states[-2], outputs[1].hidden_states[-2]], axis=-1)
        return hidden, outputs[1].text_embeds

    def loss(vector_sets, params, scheduler_state, latents, noise, timesteps, input_id_sets, time_ids=None, mask=None):
        hidden, pooled = encode(vector_sets, params, input_id_sets)
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled.astype(weight_dtype), "time_ids": time_ids.astype(weight_dtype)}
        noisy = noise_scheduler.add_noise(scheduler_state, latents, noise, timesteps)
        with nn.intercept_methods(exact_gelu_interceptor):
            pred = unet.apply({"params": params["unet"]}, noisy.astype(weight_dtype), timesteps,
                              hidden.astype(weight_dtype), added_cond_kwargs=added).sample
        target = noise_scheduler.get_velocity(scheduler_state, latents, noise, timesteps) if v_prediction else noise
        error = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
        if mask is None and snr_gamma is None:
            return jnp.mean(error)
        if mask is not None:
            per_example = masked_mse_per_example(pred, target, mask)
        else:
            per_example = jnp.mean(error, axis=tuple(range(1, pred.ndim)))
        if snr_gamma is not None:
            per_example = per_example * min_snr_weights(scheduler_state.common.alphas_cumprod, timesteps, snr_gamma,
                                                        v_prediction)
        return jnp.mean(per_example)

    return loss


def masked_mse(prediction, target, mask):
    """The masked loss, as torch_backend.model.masked_mse: per example sum(w * err^2) / sum(w) with mask
    [batch, 1, h, w] broadcast over the latent channels, then the mean over examples (so D devices still
    equal one). A weight of 0 gives that latent pixel no gradient; all ones equals the plain mean."""
    return jnp.mean(masked_mse_per_example(prediction, target, mask))


def masked_mse_per_example(prediction, target, mask):
    """masked_mse before the mean over examples: [batch]."""
    weights = jnp.broadcast_to(mask.astype(jnp.float32), prediction.shape)
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    axes = tuple(range(1, prediction.ndim))
    return jnp.sum(weights * error, axis=axes) / jnp.maximum(jnp.sum(weights, axis=axes), 1e-12)


def compute_snr(alphas_cumprod, timesteps):
    """SNR(t) = alphas_cumprod / (1 - alphas_cumprod) at each timestep, as diffusers.training_utils.compute_snr."""
    alpha = jnp.sqrt(alphas_cumprod)[timesteps].astype(jnp.float32)
    sigma = jnp.sqrt(1.0 - alphas_cumprod)[timesteps].astype(jnp.float32)
    return (alpha / sigma) ** 2


def min_snr_weights(alphas_cumprod, timesteps, gamma, v_prediction=False):
    """Min-SNR-gamma weights [batch], as torch_backend.ddpm.min_snr_weights (reference:
    textual_inversion_core.controls.min_snr_weights): min(SNR, gamma) / SNR, for v_prediction / (SNR + 1)."""
    snr = compute_snr(alphas_cumprod, timesteps)
    clipped = jnp.minimum(snr, jnp.float32(gamma))
    if v_prediction:
        return clipped / (snr + 1)
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)


def apply_norm_control(vectors, mode, target=None, max_norm=None):
    """One [num_vectors, dim] set after an optimizer step (pure): "preserve" rescales each vector to its target
    norm (a zero vector stays zero); "cap" scales down the vectors whose norm exceeds max_norm and leaves the
    others bit-identical. As torch_backend.model.apply_norm_control; textual_inversion_core.controls'
    apply_norm_control is the reference."""
    norms = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    safe = jnp.where(norms > 0, norms, 1.0)
    if mode == "preserve":
        target = jnp.asarray(target, jnp.float32).reshape(norms.shape)
        return jnp.where(norms > 0, vectors * (target / safe), vectors)
    if mode == "cap":
        return jnp.where(norms > max_norm, vectors * (jnp.float32(max_norm) / safe), vectors)
    return vectors


def mean_norms(vector_sets):
    """The mean L2 norm of each set's vectors (what is logged as embedding_norm, embedding_norm_2)."""
    return tuple(jnp.mean(jnp.linalg.norm(v, axis=-1)) for v in vector_sets)


def raw_prng_key(seed64):
    """The threefry key of a 64-bit seed ([high, low] words), as jax.random.PRNGKey gives with x64 on.

    Without x64, PRNGKey would keep only the low 32 bits; building the words here keeps all 64.
    """
    seed64 = int(seed64) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed64 >> 32, seed64 & 0xFFFFFFFF], dtype=np.uint32)


NOISE_OFFSET_STREAM = 3  # fold_in of an example's key for its --noise_offset draw (the first three draws unchanged)


def draw_example_randomness(key, latent_shape, num_timesteps, min_timestep=0, noise_offset=0.0):
    """(posterior eps, noise, timestep) of one example from its own key: the timestep uniform in
    [min_timestep, num_timesteps). With noise_offset (--noise_offset) the noise gets noise_offset x
    normal(channels, 1, 1) from fold_in(key, NOISE_OFFSET_STREAM), the same example's key, so resume and any
    number of devices see the same draw."""
    k_eps, k_noise, k_t = jax.random.split(key, 3)
    eps, noise = jax.random.normal(k_eps, latent_shape), jax.random.normal(k_noise, latent_shape)
    timestep = jax.random.randint(k_t, (), min_timestep, num_timesteps)
    if noise_offset:
        offset = jax.random.normal(jax.random.fold_in(key, NOISE_OFFSET_STREAM), (latent_shape[0], 1, 1))
        noise = noise + noise_offset * offset
    return eps, noise, timestep


def make_held_out_loss(text_encoders, unet, noise_scheduler, placeholder_id_sets, weight_dtype, scaling_factor):
    """with_state(vectors, frozen) -> loss_of(batch, prompt_ids) -> float for textual_inversion_core.validation:
    the plain loss (make_denoising_loss without --snr_gamma, no noise offset) of a held-out host batch with these
    vectors and frozen params (one device's copies). The posterior sample and noise are the example's keyed draws
    (draw_example_randomness, as in training); the timestep is the batch's fixed one. Jitted once per batch shape."""
    loss_fn = make_denoising_loss(text_encoders, unet, noise_scheduler, placeholder_id_sets, weight_dtype)

    def batch_loss(vectors, frozen, mean, std, keys, ids, timesteps, time_ids, mask):
        params = {k: v for k, v in frozen.items() if k != "scheduler"}
        eps, noise, _ = jax.vmap(lambda k: draw_example_randomness(k, mean.shape[1:], 1))(keys)
        latents = (mean + std * eps) * scaling_factor
        id_sets = tuple(ids[:, i] for i in range(ids.shape[1]))
        return loss_fn(vectors, params, frozen["scheduler"], latents, noise, timesteps, id_sets, time_ids, mask)

    jitted = jax.jit(batch_loss)

    def with_state(vectors, frozen):
        def loss_of(batch, prompt_ids):
            ids = np.stack([table[batch["prompt"][0]] for table in prompt_ids], axis=1).astype(np.int32)
            keys = np.stack([raw_prng_key(s) for s in batch["noise_seed"][0]])
            time_ids = batch["time_ids"][0].astype(np.float32) if len(prompt_ids) > 1 else None
            mask = batch["mask"][0] if "mask" in batch else None
            return float(jitted(vectors, frozen, batch["mean"][0], batch["std"][0], keys, ids,
                                batch["timestep"][0].astype(np.int32), time_ids, mask))

        return loss_of

    return with_state


def make_train_step(loss_fn, optimizer, scaling_factor, num_timesteps, controls=None, norm_targets=None):
    """The pure step train_step(state, frozen, batch) -> (state, loss, norms), to be pmapped over axis "batch";
    norms: the mean L2 norm of each vector set after the step (logged as embedding_norm[_2]).

    frozen = {"text_encoder": params, ["text_encoder_2": params,] "unet": params, "scheduler": scheduler
    state}. batch arrays are [accumulation, batch, ...] ("ids": [..., text encoders, 77]); gradients are
    averaged over micro-batches, then pmean-ed over devices, which makes D devices x B equal one device x D*B.
    controls (textual_inversion_core.controls.Controls): the timestep range and --noise_offset of the draws, and
    the norm control applied to the updated vectors (--preserve_embedding_norm to norm_targets, one [num_vectors]
    array per set, or --max_embedding_norm); --snr_gamma is the loss_fn's (make_denoising_loss).
    """
    low, high = controls.timestep_range if controls is not None else (0, num_timesteps)
    noise_offset = controls.noise_offset if controls is not None else 0.0
    norm_mode = controls.norm_mode if controls is not None else None
    targets = [np.asarray(t, np.float32) for t in norm_targets] if norm_targets is not None else None

    def draw(keys, shape):  # shape: the batch's latent shape (--resolution's, or with buckets the step's bucket's)
        return jax.vmap(lambda k: draw_example_randomness(k, shape, high, low, noise_offset))(keys)

    def train_step(state, frozen, batch):
        params = {k: v for k, v in frozen.items() if k != "scheduler"}

        def micro(carry, mb):
            grad_sum, loss_sum = carry
            eps, noise, timesteps = draw(mb["keys"], mb["mean"].shape[1:])
            latents = (mb["mean"] + mb["std"] * eps) * scaling_factor
            id_sets = tuple(mb["ids"][:, i] for i in range(mb["ids"].shape[1]))
            loss, grad = jax.value_and_grad(loss_fn)(state.vectors, params, frozen["scheduler"], latents, noise,
                                                     timesteps, id_sets, mb.get("time_ids"), mb.get("mask"))
            return (jax.tree.map(jnp.add, grad_sum, grad), loss_sum + loss), None

        zeros = (jax.tree.map(jnp.zeros_like, state.vectors), jnp.zeros((), jnp.float32))
        (grad, loss), _ = jax.lax.scan(micro, zeros, batch)
        count = batch["ids"].shape[0]
        grad = jax.lax.pmean(jax.tree.map(lambda g: g / count, grad), axis_name="batch")
        loss = jax.lax.pmean(loss / count, axis_name="batch")
        updates, opt_state = optimizer.update(grad, state.opt_state, state.vectors)
        vectors = optax.apply_updates(state.vectors, updates)
        if norm_mode is not None:
            vectors = tuple(apply_norm_control(v, norm_mode, targets[i] if targets is not None else None,
                                               controls.max_norm) for i, v in enumerate(vectors))
        return state.replace(vectors=vectors, opt_state=opt_state, step=state.step + 1), loss, mean_norms(vectors)

    return train_step


def new_train_state(optimizer, vector_sets, step=0, adam_sets=None):
    """A TrainState at `step`; AdamW's moments from a checkpoint (the PyTorch names) when given."""
    vectors = tuple(jnp.asarray(v, jnp.float32) for v in vector_sets)
    opt_state = optimizer.init(vectors)
    if adam_sets is not None:
        opt_state = optax.tree_utils.tree_set(
            opt_state, count=jnp.asarray(adam_sets[0].step, jnp.int32),
            mu=tuple(jnp.asarray(a.exp_avg, jnp.float32) for a in adam_sets),
            nu=tuple(jnp.asarray(a.exp_avg_sq, jnp.float32) for a in adam_sets))
    return TrainState(vectors=vectors, opt_state=opt_state, step=jnp.asarray(step, jnp.int32))


def adam_moments(state):
    """AdamW's moments of each vector set of a (host, unreplicated) TrainState, under the PyTorch names
    (None before step 1)."""
    adam = next(s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState))
    count = int(adam.count)
    if not count:
        return None
    return [AdamMoments(np.asarray(mu, np.float32), np.asarray(nu, np.float32), count)
            for mu, nu in zip(adam.mu, adam.nu)]


def add_placeholder_rows(text_encoder, te_params, vocab_size, placeholder_ids, start_vectors):
    """Grow the token-embedding matrix (in te_params, in place) to vocab_size rows; the placeholder
    rows hold start_vectors [num_vectors, dim] (the frozen copy; the trained ones are the state's)."""
    embeddings_params = te_params["text_model"]["embeddings"]["token_embedding"]
    table = np.asarray(embeddings_params["embedding"], np.float32)
    grown = np.zeros((vocab_size, table.shape[1]), np.float32)
    grown[: table.shape[0]] = table
    grown[placeholder_ids] = np.asarray(start_vectors, np.float32)
    embeddings_params["embedding"] = grown
    text_encoder.config.vocab_size = vocab_size  # the Flax Embed checks the matrix against the config


def token_embedding_table(te_params):
    return te_params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def merged_text_encoder_params(params, placeholder_ids, vectors, dtype=None):
    """Text-encoder params with the learned rows written into the token-embedding matrix."""
    table = token_embedding_table(params)
    table = table.at[jnp.asarray(placeholder_ids)].set(jnp.asarray(vectors, dtype=table.dtype))
    merged = {**params, "text_model": {**params["text_model"], "embeddings": {
        **params["text_model"]["embeddings"], "token_embedding": {"embedding": table}}}}
    if dtype is not None:
        merged = jax.tree.map(lambda x: x.astype(dtype), merged)
    return merged


def replicate(tree, devices, sharding):
    """One copy of every leaf on each device, as a [devices, ...] array laid out like pmap's outputs.

    Copies go straight to their device: stacking first would put all of them on device 0 (or in host
    memory) at once, which does not fit for SD-sized weights on 8 accelerators.
    """

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + tuple(x.shape), sharding, shards)

    return jax.tree.map(put, tree)


def encode_posteriors(vae, vae_params):
    """encode(list of CHW pixel arrays) -> (means, stds) NCHW like the PyTorch VAE's, for the core
    LatentCache. One image per call: a single compiled shape, whatever the batch."""

    def posterior(params, pixels):
        dist = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
        return jnp.transpose(dist.mean, (0, 3, 1, 2)), jnp.transpose(dist.std, (0, 3, 1, 2))

    jitted = jax.jit(posterior)

    def encode(pixels):
        pairs = [jitted(vae_params, jnp.asarray(p[None])) for p in pixels]
        return [np.asarray(m[0]) for m, _ in pairs], [np.asarray(s[0]) for _, s in pairs]

    return encode
