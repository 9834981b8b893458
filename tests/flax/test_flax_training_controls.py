"""The opt-in training controls in the Flax trainer (README "Training controls"), as tests/test_training_controls.py
does for the PyTorch one: the formulas against diffusers' compute_snr and the numpy references of
textual_inversion_core.controls, the per-example draws, and three short runs: a capped run with the norms logged,
a run with every other control on 2 devices, and its checkpoint resumed on 1 device."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from flax_backend import model as fm
from helpers import FLOAT32_EPS, flax_base_args, read_vectors, run_flax, run_flax_in_process
from test_logging import read_events
from textual_inversion_core import controls

GAMMA = 5.0
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_and_the_numpy_reference(prediction_type):
    import torch
    from diffusers import DDPMScheduler, FlaxDDPMScheduler
    from diffusers.training_utils import compute_snr

    timesteps = np.array([0, 1, 50, 150, 250, 400, 700, 999])
    torch_sched = DDPMScheduler(prediction_type=prediction_type, **SCHEDULE)
    snr = compute_snr(torch_sched, torch.from_numpy(timesteps))  # diffusers' train_text_to_image.py, written out
    expected = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = (expected / snr if prediction_type == "epsilon" else expected / (snr + 1)).numpy()
    state = FlaxDDPMScheduler(prediction_type=prediction_type, **SCHEDULE).create_state()
    ours = np.asarray(fm.min_snr_weights(state.common.alphas_cumprod, jnp.asarray(timesteps), GAMMA,
                                         prediction_type == "v_prediction"))
    # Each framework's scheduler builds alphas_cumprod as a float32 running product of 1000 factors, in another order
    # (XLA scans in a tree): a product of n float32 factors is within n eps relative, and so is each weight
    # (measured 31 eps at t=999). A wrong formula is off by far more (v_prediction divided by snr: 8.5e-4 at t=0).
    np.testing.assert_allclose(ours, expected, rtol=SCHEDULE["num_train_timesteps"] * FLOAT32_EPS)
    reference = controls.min_snr_weights(controls.snr(np.asarray(state.common.alphas_cumprod), timesteps), GAMMA,
                                         prediction_type)
    np.testing.assert_allclose(ours, reference, rtol=1e-6)
    assert ours.min() < 0.1


def test_snr_weighted_masked_loss_parts():
    rng = np.random.default_rng(0)
    pred, target = (jnp.asarray(rng.normal(size=(3, 4, 6, 6)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((3, 1, 6, 6)) > 0.5, jnp.float32)
    per_example = fm.masked_mse_per_example(pred, target, mask)
    assert per_example.shape == (3,)
    assert float(fm.masked_mse(pred, target, mask)) == float(jnp.mean(per_example))
    np.testing.assert_allclose(np.asarray(fm.masked_mse_per_example(pred, target, jnp.ones((3, 1, 6, 6)))),
                               np.mean(np.square(np.asarray(pred) - np.asarray(target)), axis=(1, 2, 3)), rtol=1e-6)


def draw(seeds, shape=(4, 8, 8), num_timesteps=1000, min_timestep=0, noise_offset=0.0):
    keys = jnp.asarray(np.stack([fm.raw_prng_key(s) for s in seeds]))
    return jax.vmap(lambda k: fm.draw_example_randomness(k, shape, num_timesteps, min_timestep, noise_offset))(keys)


def test_noise_offset_adds_a_constant_per_example_and_channel_from_the_examples_own_key():
    seeds = [11, 22, 33]
    eps, plain, t_plain = draw(seeds)
    eps_offset, offset, t_offset = draw(seeds, noise_offset=0.1)
    assert np.array_equal(eps, eps_offset) and np.array_equal(t_plain, t_offset)  # earlier draws unchanged
    added = np.asarray(offset - plain)
    per_channel = added[:, :, :1, :1]
    np.testing.assert_allclose(added, np.broadcast_to(per_channel, added.shape), rtol=0, atol=1e-6)
    assert np.abs(per_channel).min() > 0 and per_channel.reshape(3, -1).std(1).min() > 0
    assert 0.02 < np.abs(per_channel).mean() < 0.2
    # keyed by the example: the same seed gives the same draw wherever it sits, with any partners
    assert np.array_equal(draw([22], noise_offset=0.1)[1][0], offset[1])
    assert np.array_equal(draw([99, 7, 22, 5], noise_offset=0.1)[1][2], offset[1])
    # off: exactly the draws of before
    for before, after in zip(draw(seeds), draw(seeds, min_timestep=0, noise_offset=0.0)):
        assert np.array_equal(before, after)


def test_timesteps_fall_in_the_range():
    timesteps = np.asarray(draw(list(range(200)), num_timesteps=110, min_timestep=100)[2])
    assert set(timesteps.tolist()) == set(range(100, 110))
    assert (np.asarray(draw(list(range(20)), num_timesteps=1000, min_timestep=999)[2]) == 999).all()


def test_norm_controls_match_the_reference_and_leave_vectors_under_the_cap_untouched():
    rng = np.random.default_rng(3)
    start = rng.normal(size=(3, 16)).astype(np.float32)
    moved = (start * np.array([[2.0], [0.5], [1.0]], np.float32) + 0.01 * rng.normal(size=(3, 16))).astype(np.float32)
    targets = controls.vector_norms(start)
    preserved = np.asarray(fm.apply_norm_control(jnp.asarray(moved), "preserve", targets))
    np.testing.assert_allclose(controls.vector_norms(preserved), targets, rtol=1e-6)
    np.testing.assert_allclose(preserved, controls.apply_norm_control(moved, "preserve", targets), rtol=1e-6, atol=1e-7)
    cap = float(np.median(controls.vector_norms(moved)))
    capped = np.asarray(fm.apply_norm_control(jnp.asarray(moved), "cap", max_norm=cap))
    assert controls.vector_norms(capped).max() <= cap * (1 + 1e-6)
    under = controls.vector_norms(moved) <= cap
    assert under.any() and np.array_equal(capped[under], moved[under])
    np.testing.assert_allclose(capped, controls.apply_norm_control(moved, "cap", max_norm=cap), rtol=1e-6)
    assert np.array_equal(np.asarray(fm.apply_norm_control(jnp.zeros((2, 4)), "preserve", np.ones(2))), np.zeros((2, 4)))
    np.testing.assert_allclose([float(n) for n in fm.mean_norms((jnp.asarray(moved),))],
                               [controls.vector_norms(moved).mean()], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Runs

STEPS = 3
HIGH_LR = 0.5
CONTROLS = dict(snr_gamma=GAMMA, noise_offset=0.1, min_timestep=100, max_timestep=900, preserve_embedding_norm=True)


def initializer_norm(pipeline):
    from transformers import CLIPTokenizer

    toy = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer").encode("toy", add_special_tokens=False)[0]
    weights = load_file(os.path.join(pipeline, "text_encoder", "model.safetensors"))
    table = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
    return float(np.linalg.norm(table[toy])), table[toy]


def test_max_embedding_norm_caps_every_step_and_the_logged_norm_is_the_vectors(tiny_pipeline, train_images,
                                                                                 compile_cache, tmp_path):
    cap = 1.05 * initializer_norm(tiny_pipeline)[0]
    out = tmp_path / "capped"
    proc = run_flax_in_process(flax_base_args(tiny_pipeline, train_images, str(out), max_train_steps=STEPS,
                                              learning_rate=HIGH_LR, save_steps=1, max_embedding_norm=cap,
                                              report_to="tensorboard", logging_steps=2), cache=compile_cache)
    scalars, _ = read_events(out / "logs")
    assert [s for s, _ in scalars["embedding_norm"]] == list(range(1, STEPS + 1)) and "embedding_norm_2" not in scalars
    for step, logged in scalars["embedding_norm"]:
        norms = controls.vector_norms(read_vectors(out / f"learned_embeds-steps-{step}.safetensors"))
        assert norms.max() <= cap * (1 + 1e-6), (step, norms, cap)
        np.testing.assert_allclose(logged, norms.mean(), rtol=1e-5)
    assert np.isclose(controls.vector_norms(read_vectors(out / "learned_embeds.safetensors")), cap, rtol=1e-5).any()
    assert "norm=" in proc.stderr


@pytest.fixture(scope="module")
def controlled(tiny_pipeline, train_images, compile_cache, tmp_path_factory):
    """Every other control on 2 devices (1 example each), a checkpoint after each step; its checkpoint-1 resumed on
    1 device with the same global batch of 2."""
    root = tmp_path_factory.mktemp("flax-controls")
    settings = dict(max_train_steps=STEPS, learning_rate=HIGH_LR, save_steps=1, checkpointing_steps=1, **CONTROLS)
    full, resumed = root / "full", root / "resumed"
    run_flax(flax_base_args(tiny_pipeline, train_images, str(full), train_batch_size=1, report_to="tensorboard",
                            **settings), devices=2, cache=compile_cache)
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    proc = run_flax_in_process(flax_base_args(tiny_pipeline, train_images, str(resumed), train_batch_size=2,
                                              resume_from_checkpoint="latest", **settings), cache=compile_cache)
    assert "resumed from" in proc.stderr and "another global batch" not in proc.stderr
    return full, resumed


def test_preserve_embedding_norm_keeps_each_vector_at_its_start_norm(controlled, tiny_pipeline):
    full, _ = controlled
    start_norm, start = initializer_norm(tiny_pipeline)
    for step in range(1, STEPS + 1):
        vectors = read_vectors(full / f"learned_embeds-steps-{step}.safetensors")
        np.testing.assert_allclose(controls.vector_norms(vectors), start_norm, rtol=1e-5)
        assert np.abs(vectors - start).max() > 1e-2 * start_norm  # the direction did train
    scalars, _ = read_events(full / "logs")
    assert [s for s, _ in scalars["embedding_norm"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["embedding_norm"]], start_norm, rtol=1e-5)
    assert all(np.isfinite(v) for _, v in scalars["loss"])


def test_resume_on_one_device_equals_the_uninterrupted_two_device_run(controlled):
    full, resumed = controlled
    for name in ("learned_embeds-steps-2.safetensors", "learned_embeds.safetensors"):
        np.testing.assert_allclose(read_vectors(resumed / name), read_vectors(full / name), rtol=0, atol=1e-6)
