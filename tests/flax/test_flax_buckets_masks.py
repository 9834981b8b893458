"""Buckets, masks and the initializer phrase in the Flax trainer (the dataset rules are the shared core's,
tests/test_buckets.py and tests/test_masked_loss.py check them): the Flax masked loss (a masked-out region
adds no gradient, all ones is the plain mean; tests/test_masked_loss.py checks the same through the PyTorch
models), then end to end on the mixed folder (portrait, landscape, square, RGBA with a transparent
background, captions with one missing): it trains with one compiled step per bucket shape, resumes exactly,
and 2 devices equal 1; and --initializer_token "red toy car" starts from the phrase's embeddings."""

import os
import shutil

import numpy as np
import pytest

from bucket_data import BUCKET_FLAGS, write_mixed_folder
from flax_backend import model as flax_model
from helpers import flax_base_args, read_vectors, run_flax, run_flax_in_process

STEPS = 4
RUN_FLAGS = dict(BUCKET_FLAGS, random_crop=True, alpha_mask=True, caption_extension=".txt", repeats=1,
                 max_train_steps=STEPS)


def test_flax_masked_loss_leaves_masked_out_pixels_without_gradient():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    prediction, target = (jnp.asarray(rng.standard_normal((3, 4, 6, 6)), jnp.float32) for _ in range(2))
    mask = np.ones((3, 1, 6, 6), np.float32)
    mask[:, :, :2] = 0
    mask[2] = 0  # an example masked out entirely
    loss, grad = jax.value_and_grad(flax_model.masked_mse)(prediction, target, jnp.asarray(mask))
    grad = np.asarray(grad)
    assert (grad[:, :, :2] == 0).all() and (grad[2] == 0).all() and (grad[:2, :, 2:] != 0).all()
    kept = np.square(np.asarray(prediction - target))[:2, :, 2:]
    np.testing.assert_allclose(float(loss), kept.reshape(2, -1).mean(axis=1).sum() / 3, rtol=1e-6)
    plain = float(jnp.mean(jnp.square(prediction - target)))
    np.testing.assert_allclose(float(flax_model.masked_mse(prediction, target, jnp.ones((3, 1, 6, 6)))), plain, rtol=1e-6)


# ---- End to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_folder(tmp_path_factory.mktemp("flax-buckets") / "mixed")


@pytest.fixture(scope="module")
def one_device(tiny_pipeline, mixed, compile_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("flax-bucket-run") / "one")
    result = run_flax_in_process(flax_base_args(tiny_pipeline, mixed, out, train_batch_size=2, checkpointing_steps=2,
                                                **RUN_FLAGS), cache=compile_cache)
    return out, result


def test_mixed_folder_trains_in_the_flax_trainer(one_device):
    out, result = one_device
    lines = result.stderr.splitlines()
    assert any(line.startswith("aspect-ratio buckets: 5 of about 64x64 pixels") for line in lines), result.stderr[-3000:]
    assert sum("have no .txt caption file" in line and "landscape_0.png" in line for line in lines) == 1
    assert sum("have no alpha channel and are trained unmasked" in line for line in lines) == 1
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()


def test_mixed_folder_resumes_exactly_in_the_flax_trainer(one_device, tiny_pipeline, mixed, compile_cache, tmp_path):
    out, _ = one_device
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = run_flax_in_process(flax_base_args(tiny_pipeline, mixed, resumed, train_batch_size=2,
                                                resume_from_checkpoint="latest", **RUN_FLAGS), cache=compile_cache)
    assert "resumed from" in result.stderr
    np.testing.assert_array_equal(read_vectors(os.path.join(resumed, "learned_embeds.safetensors")),
                                  read_vectors(os.path.join(out, "learned_embeds.safetensors")))


def test_mixed_folder_on_two_devices_equals_one(one_device, tiny_pipeline, mixed, compile_cache, tmp_path):
    out, _ = one_device
    two = str(tmp_path / "two")
    result = run_flax(flax_base_args(tiny_pipeline, mixed, two, train_batch_size=1, **RUN_FLAGS), devices=2,
                      cache=compile_cache)
    assert "devices = 2" in result.stderr
    np.testing.assert_allclose(read_vectors(os.path.join(two, "learned_embeds.safetensors")),
                               read_vectors(os.path.join(out, "learned_embeds.safetensors")), rtol=0, atol=1e-6)


def test_flax_trainer_starts_from_the_initializer_phrase(tiny_pipeline, train_images, compile_cache, tmp_path):
    """--learning_rate 0 exports the start vectors unchanged: the phrase's rule (tokens.initializer_rows)."""
    from safetensors.numpy import load_file
    from transformers import CLIPTokenizer

    from textual_inversion_core.tokens import initializer_vectors

    out = str(tmp_path / "out")
    run_flax_in_process(flax_base_args(tiny_pipeline, train_images, out, initializer_token="red toy car", num_vectors=2,
                            learning_rate=0, max_train_steps=1, export_formats="diffusers"), cache=compile_cache)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("red", "toy", "car")]
    weights = load_file(os.path.join(tiny_pipeline, "text_encoder", "model.safetensors"))
    table = next(v for k, v in weights.items() if k.endswith("token_embedding.weight")).astype(np.float32)
    np.testing.assert_array_equal(read_vectors(os.path.join(out, "learned_embeds.safetensors")),
                                  initializer_vectors(table, ids, 2))
