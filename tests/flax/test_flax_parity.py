"""The Flax objective equals the PyTorch one: same inputs -> same loss and same gradient of the vectors."""

import numpy as np
import pytest

from flax_backend import model as flax_model
from flax_backend import weights as flax_weights
from helpers import FRAMEWORK_GRADIENT_PARITY
from textual_inversion_core.tokens import add_placeholder_tokens


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_flax_loss_and_gradient_equal_pytorch(tiny_pipeline, prediction_type):
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import DDPMScheduler, FlaxDDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    num_vectors = 2
    rng = np.random.default_rng(3)

    # PyTorch side, exactly as textual_inversion.py prepares it.
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    placeholder_ids, (initializer_id,) = add_placeholder_tokens(tokenizer, "<cat-toy>", num_vectors, "toy")
    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet").eval()
    from torch_backend import ddpm
    from torch_backend import model as torch_model

    torch_model.verify_text_encoder_loaded(text_encoder, tiny_pipeline)
    text_encoder.resize_token_embeddings(len(tokenizer))
    for module in (text_encoder, unet):
        module.requires_grad_(False)
    base = text_encoder.get_input_embeddings()
    dim = base.embedding_dim
    # Vectors away from the initializer row, so the gradient is not a special case.
    vectors0 = (base.weight.data[initializer_id].numpy()[None]
                + 0.05 * rng.standard_normal((num_vectors, dim))).astype(np.float32)
    with torch.no_grad():
        base.weight[placeholder_ids] = torch.from_numpy(vectors0)
    embedding = torch_model.PlaceholderEmbedding(base, placeholder_ids, torch.from_numpy(vectors0))
    text_encoder.set_input_embeddings(embedding)
    scheduler_pt = DDPMScheduler.from_pretrained(tiny_pipeline, subfolder="scheduler", prediction_type=prediction_type)

    placeholder = " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
    prompts = [f"a photo of a {placeholder}", f"a rendering of the small {placeholder}"]
    ids = np.asarray(tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length).input_ids, dtype=np.int64)
    latents = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    timesteps = np.array([37, 911], dtype=np.int64)

    loss_pt = ddpm.denoising_loss(text_encoder, unet, scheduler_pt, torch.from_numpy(latents),
                                  torch.from_numpy(noise), torch.from_numpy(timesteps), torch.from_numpy(ids),
                                  torch.float32)
    loss_pt.backward()
    loss_pt = loss_pt.detach()
    grad_pt = embedding.vectors.grad.numpy()
    assert np.linalg.norm(grad_pt) > 0

    # Flax side: weights converted from the same PyTorch files by the trainer's own loader.
    te_model, te_params, _ = flax_weights.load_component(tiny_pipeline, "text_encoder", None, jnp.float32)
    unet_model, unet_params, _ = flax_weights.load_component(tiny_pipeline, "unet", None, jnp.float32)
    initializer_row = np.asarray(flax_model.token_embedding_table(te_params))[initializer_id]
    flax_model.add_placeholder_rows(te_model, te_params, len(tokenizer), placeholder_ids,
                                    np.repeat(initializer_row[None], num_vectors, axis=0))
    scheduler_fx, _, config = flax_weights.noise_schedule(tiny_pipeline)
    assert config["beta_schedule"] == "scaled_linear"
    scheduler_fx = FlaxDDPMScheduler(**{**scheduler_fx.config, "prediction_type": prediction_type})
    loss_fn = flax_model.make_denoising_loss([te_model], unet_model, scheduler_fx, [placeholder_ids], jnp.float32)
    params = {"text_encoder": te_params, "unet": unet_params}
    loss_fx, (grad_fx,) = jax.jit(jax.value_and_grad(loss_fn))(
        (jnp.asarray(vectors0),), params, scheduler_fx.create_state(), jnp.asarray(latents), jnp.asarray(noise),
        jnp.asarray(timesteps, jnp.int32), (jnp.asarray(ids, jnp.int32),))

    assert abs(float(loss_fx) - float(loss_pt)) / abs(float(loss_pt)) <= 1e-4, (float(loss_fx), float(loss_pt))
    assert grad_fx.shape == grad_pt.shape == (num_vectors, dim)
    errors = [_relative_error(grad_fx, grad_pt)] + [_relative_error(grad_fx[r], grad_pt[r]) for r in range(num_vectors)]
    print("relative gradient error (all, per vector)", errors, "loss", float(loss_fx), float(loss_pt))
    # each vector's own gradient too, not only the total
    assert max(errors) <= FRAMEWORK_GRADIENT_PARITY, errors
