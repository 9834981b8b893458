"""SD3 and Flux.1 training (flow matching) in the PyTorch trainer: the loss and the sigma draw against diffusers'
training_utils, each family trains and writes its files, exact resume, 2 processes = 1 process, T5 freed when it is
not trained, and the one-line refusals."""

import json
import os
import shutil
import sys
import weakref

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import base_args, run_in_process, run_script
from textual_inversion_core import flow_matching as reference
from textual_inversion_core.errors import UserError
from torch_backend import flow_matching as fm
from torch_backend.model import masked_mse_per_example

FLOW = dict(resolution=32, max_sequence_length=32, max_train_steps=4, learning_rate=5e-3)
SCHEMES = reference.WEIGHTING_SCHEMES


def flow_args(pipeline, images, out, **overrides):
    return base_args(pipeline, images, out, **{**FLOW, **overrides})


# ------------------------------------------------------------------ the loss and the draw, against diffusers


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sigma_draw_and_loss_match_diffusers_training_utils(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    settings = fm.FlowSettings(scheme, logit_mean=0.3, logit_std=1.4, mode_scale=1.29)
    seeds = [3, 17, 101, 4242, 77, 9]
    ours = torch.cat([fm.draw_u(torch.Generator().manual_seed(s), settings) for s in seeds])
    # diffusers' helper with the same generator state, one example at a time (our draw is keyed per example)
    theirs = torch.cat([compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.3, logit_std=1.4, mode_scale=1.29,
                                                              generator=torch.Generator().manual_seed(s))
                        for s in seeds])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # and the core's numpy reference, from the same generator draws
    draws = [torch.Generator().manual_seed(s) for s in seeds]
    first = torch.cat([(torch.randn if scheme == "logit_normal" else torch.rand)((1,), generator=g) for g in draws])
    kind = "normal" if scheme == "logit_normal" else "uniform"
    np.testing.assert_allclose(reference.density_u(scheme, logit_mean=0.3, logit_std=1.4, **{kind: first.numpy()}),
                               theirs.numpy(), rtol=1e-5, atol=1e-6)

    # sigmas: diffusers' scripts index the scheduler's timesteps by u, then look the sigma up by timestep
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    timesteps, sigmas = fm.schedule_points(scheduler, ours)
    indices = (theirs * 1000).long().clamp(max=999)
    expected_t = scheduler.timesteps[indices]
    expected_sigma = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in expected_t])
    assert torch.equal(timesteps, expected_t)
    torch.testing.assert_close(sigmas, expected_sigma.float(), rtol=0, atol=0)

    # the loss: diffusers' weighted MSE against noise - x0, with noisy = (1 - sigma) x0 + sigma noise
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    s4 = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(fm.noisy_input(latents, noise, sigmas), (1.0 - s4) * latents + s4 * noise)
    prediction = 0.5 * fm.noisy_input(latents, noise, sigmas) + 0.1
    weighting = compute_loss_weighting_for_sd3(scheme, s4)
    expected = torch.mean((weighting.float() * (prediction - (noise - latents)) ** 2).reshape(6, -1), 1).mean()
    loss = fm.flow_loss(prediction, latents, noise, sigmas, scheme)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    # the numpy reference of the core says the same
    np.testing.assert_allclose(reference.loss_weights(scheme, sigmas.numpy()), weighting.flatten().numpy(), rtol=1e-5)
    # masked: each example's masked MSE times its weight; all-ones is the unmasked loss
    mask = (torch.rand(6, 1, 8, 8, generator=g) > 0.5).float()
    per_example = masked_mse_per_example(prediction, noise - latents, mask)
    torch.testing.assert_close(fm.flow_loss(prediction, latents, noise, sigmas, scheme, mask),
                               (per_example * weighting.flatten()).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(fm.flow_loss(prediction, latents, noise, sigmas, scheme, torch.ones(6, 1, 8, 8)),
                               expected, rtol=1e-5, atol=0)


def test_mode_sampling_at_a_zero_draw_stays_inside_the_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.tensor([1.0, 0.0])  # mode sampling maps a uniform 0 to u = 1: diffusers would index timesteps[1000]
    timesteps, sigmas = fm.schedule_points(scheduler, u)
    assert torch.equal(timesteps, scheduler.timesteps[[999, 0]]) and sigmas.shape == (2,)


def fake_batch(seeds, shape=(16, 4, 4)):
    n = len(seeds)
    return {"mean": np.zeros((1, n) + shape, np.float32), "std": np.ones((1, n) + shape, np.float32),
            "noise_seed": np.array([seeds], np.uint64), "prompt": np.zeros((1, n), np.int64),
            "time_ids": np.zeros((1, n, 6), np.int64)}


def test_each_examples_draws_are_its_own_whatever_its_partners():
    """What exact resume and N processes = 1 rest on: an example's latents sample, noise and sigma come from its own
    generator, in that order, shifted and scaled by the VAE's factors."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    vae = SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611)
    settings = fm.FlowSettings("logit_normal")
    ids = [torch.zeros((1, 8), dtype=torch.long)]
    together = fm.device_batch(fake_batch([11, 22, 33]), 0, ids, settings, scheduler, vae, "cpu")
    alone = fm.device_batch(fake_batch([22]), 0, ids, settings, scheduler, vae, "cpu")
    elsewhere = fm.device_batch(fake_batch([5, 99, 22]), 0, ids, settings, scheduler, vae, "cpu")
    for field in ("latents", "noise", "timesteps", "sigmas"):
        value = getattr(together, field)[1]
        assert torch.equal(getattr(alone, field)[0], value) and torch.equal(getattr(elsewhere, field)[2], value)
    g = torch.Generator().manual_seed(22)
    eps, noise = torch.randn((16, 4, 4), generator=g), torch.randn((16, 4, 4), generator=g)
    assert torch.equal(alone.latents[0], (eps - 0.1159) * 0.3611) and torch.equal(alone.noise[0], noise)
    assert torch.equal(alone.sigmas, fm.schedule_points(scheduler, fm.draw_u(g, settings))[1])


# ------------------------------------------------------------------ training runs


def test_flux_trains_writes_its_files_and_resumes_exactly(tiny_flux_pipeline, train_images, tmp_path):
    full = str(tmp_path / "full")
    run_script(flow_args(tiny_flux_pipeline, train_images, full, checkpointing_steps=2), check=True)
    assert sorted(f for f in os.listdir(full) if f.startswith("learned_embeds")) == \
        ["learned_embeds.bin", "learned_embeds.safetensors"]  # CLIP-L only: T5 is not trained by default
    vectors = load_file(os.path.join(full, "learned_embeds.safetensors"))["<cat-toy>"]
    assert vectors.shape == (1, 32)  # tiny Flux's CLIP-L width
    assert list(load_file(os.path.join(full, "cat-toy.safetensors"))) == ["clip_l"]
    state = json.load(open(os.path.join(full, "checkpoint-4", "training_state.json")))
    assert state["family"] == "flux" and state["encoders"] == ["clip_l"]

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run_script(flow_args(tiny_flux_pipeline, train_images, resumed, checkpointing_steps=2,
                         resume_from_checkpoint="latest"), check=True)
    for name in ("learned_embeds.safetensors", "checkpoint-4/training_state.safetensors"):
        a, b = load_file(os.path.join(full, name)), load_file(os.path.join(resumed, name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name


def test_sd3_with_t5_trains_every_encoder(tiny_sd3_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    # with aspect-ratio buckets (the 80x96 images train at 32x48) and the mode draw
    proc = run_script(flow_args(tiny_sd3_pipeline, train_images, out, enable_t5_ti=True, num_vectors=2,
                                initializer_token="red toy", weighting_scheme="mode", enable_bucket=True,
                                min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=16), check=True)
    assert "trained: clip_l (text_encoder), clip_g (text_encoder_2), t5xxl (text_encoder_3)" in proc.stderr
    widths = {"learned_embeds": 32, "learned_embeds_2": 48, "learned_embeds_3": 96}  # CLIP-L, CLIP-G, T5
    for stem, width in widths.items():
        assert load_file(os.path.join(out, f"{stem}.safetensors"))["<cat-toy>"].shape == (2, width)
    single = load_file(os.path.join(out, "cat-toy.safetensors"))
    assert {k: v.shape for k, v in single.items()} == {"clip_l": (2, 32), "clip_g": (2, 48), "t5xxl": (2, 96),
                                                         "t5": (2, 96)}


def test_sd3_without_t5_says_it_is_cached_and_freed(tiny_sd3_pipeline, train_images, tmp_path, monkeypatch):
    """Also: with bf16 the transformer is read as bf16, never held whole in fp32 first (SD3.5-medium: 9.9 GB more at
    its peak, bench/notes.md)."""
    import diffusers

    read, load = [], diffusers.SD3Transformer2DModel.from_pretrained

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        read.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(diffusers.SD3Transformer2DModel, "from_pretrained", spy)
    proc = run_in_process(flow_args(tiny_sd3_pipeline, train_images, str(tmp_path / "out"), max_train_steps=1,
                                    mixed_precision="bf16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained: clip_l (text_encoder), clip_g (text_encoder_2); cached once per prompt and freed: t5xxl " \
           "(text_encoder_3)" in proc.stderr
    assert read == [torch.bfloat16]


@pytest.mark.slow
def test_two_processes_equal_one_on_flux_with_t5(tiny_flux_pipeline, train_images, tmp_path):
    common = dict(enable_t5_ti=True, max_train_steps=3)
    one = str(tmp_path / "one")
    run_script(flow_args(tiny_flux_pipeline, train_images, one, train_batch_size=2, **common), check=True)
    two = str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_script(flow_args(tiny_flux_pipeline, train_images, two, train_batch_size=1, **common), launcher=torchrun,
               env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=600, check=True)
    for stem in ("learned_embeds", "learned_embeds_2"):  # CLIP-L and T5
        a = load_file(os.path.join(one, f"{stem}.safetensors"))["<cat-toy>"]
        b = load_file(os.path.join(two, f"{stem}.safetensors"))["<cat-toy>"]
        # the all-reduce sums the two halves' gradients in another order than one batch's mean (as for SD)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ T5 is freed when it is not trained


@pytest.mark.parametrize("enable_t5_ti", [False, True])
def test_t5_is_not_resident_during_the_loop_unless_trained(tiny_flux_pipeline, train_images, tmp_path, monkeypatch,
                                                          enable_t5_ti):
    import textual_inversion
    from torch_backend import model as tm
    from torch_backend.families.base import Family

    loaded, seen = {}, []
    load = Family.load_text_encoder

    def recording_load(self, index):
        module = load(self, index)
        loaded[self.spec.encoders[index].kind] = weakref.ref(module)
        return module

    step = tm.train_step

    def checking_step(accelerator, models, *args, **kwargs):
        seen.append((loaded["t5"]() is not None, any(type(te).__name__ == "T5EncoderModel"
                                                     for te in models.text_encoders if te is not None)))
        return step(accelerator, models, *args, **kwargs)

    monkeypatch.setattr(Family, "load_text_encoder", recording_load)
    monkeypatch.setattr(tm, "train_step", checking_step)
    argv = flow_args(tiny_flux_pipeline, train_images, str(tmp_path / "out"), max_train_steps=2,
                     enable_t5_ti=enable_t5_ti)
    assert textual_inversion.main(argv) == 0
    assert seen == [(enable_t5_ti, enable_t5_ti)] * 2  # alive (and held) only when its vectors train


# ------------------------------------------------------------------ refusals, one line each, before models load


def refused(argv):
    import textual_inversion

    with pytest.raises(UserError) as caught:
        textual_inversion.main(argv)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_t5_and_flow_flags_on_a_model_without_them(tiny_pipeline, tiny_sdxl_pipeline, train_images, tmp_path,
                                                   no_model_loading):
    out = str(tmp_path / "out")
    assert "--enable_t5_ti is for models with a T5 text encoder" in refused(
        base_args(tiny_pipeline, train_images, out, enable_t5_ti=True))
    assert "--max_sequence_length is for models with a T5" in refused(
        base_args(tiny_sdxl_pipeline, train_images, out, max_sequence_length=77))
    assert "--weighting_scheme is a flow-matching flag" in refused(
        base_args(tiny_pipeline, train_images, out, weighting_scheme="logit_normal"))


@pytest.mark.parametrize("flag, value", [("snr_gamma", 5.0), ("noise_offset", 0.05), ("min_timestep", 100)])
def test_ddpm_controls_on_a_flow_model(tiny_flux_pipeline, train_images, tmp_path, no_model_loading, flag, value):
    message = refused(flow_args(tiny_flux_pipeline, train_images, str(tmp_path / "out"), **{flag: value}))
    assert message.startswith(f"--{flag} is a DDPM control; Flux.1 trains with flow matching")


def test_an_initializer_t5_cannot_encode(tiny_flux_pipeline, train_images, tmp_path, no_model_loading):
    # "sculpture" is one CLIP token but seven pieces in the tiny T5 vocabulary
    argv = flow_args(tiny_flux_pipeline, train_images, str(tmp_path / "out"), initializer_token="sculpture")
    message = refused(argv + ["--enable_t5_ti"])
    assert message.startswith("T5's vocabulary (tokenizer_2/, trained with --enable_t5_ti): --initializer_token "
                              "'sculpture'"), message


def test_a_checkpoint_of_another_family_or_encoder_set(tiny_pipeline, tiny_flux_pipeline, train_images, tmp_path,
                                                       no_model_loading):
    from textual_inversion_core import checkpoints, run

    # a Flux CLIP-only checkpoint holds one set 32 wide, exactly like one of the tiny SD pipeline
    out = str(tmp_path / "out")
    tensors = {"vectors": np.zeros((1, 32), np.float32)}
    checkpoints.save_checkpoint(out, 2, tensors, {"seed": 1, "num_vectors": 1, "family": "flux",
                                                  "encoders": ["clip_l"], "optimizer_step": 0.0})
    resume = dict(resume_from_checkpoint="latest")
    assert "was made for flux training clip_l, this run is sd training clip_l" in refused(
        base_args(tiny_pipeline, train_images, out, **resume))
    assert "this run is flux training clip_l+t5xxl" in refused(
        flow_args(tiny_flux_pipeline, train_images, out, enable_t5_ti=True, **resume))
    # an SD checkpoint (no family recorded, as every SD/SDXL checkpoint) on Flux
    sd_out = str(tmp_path / "sd")
    checkpoints.save_checkpoint(sd_out, 2, tensors, {"seed": 1, "num_vectors": 1, "optimizer_step": 0.0})
    assert f"was made for {run.describe_encoders(1)}, this model is Flux.1" in refused(
        flow_args(tiny_flux_pipeline, train_images, sd_out, **resume))


def test_transformer_configs_the_loss_cannot_handle(tiny_flux_pipeline, train_images, tmp_path, no_model_loading):
    from tools.make_tiny_pipeline import make_pipeline

    schnell = make_pipeline(str(tmp_path / "schnell"), size="tiny-flux-schnell", seed=0)
    out = str(tmp_path / "out")
    assert "this Flux transformer has no guidance embedding" in refused(
        flow_args(schnell, train_images, out, guidance_scale=3.5))
    fill = str(tmp_path / "fill")
    shutil.copytree(tiny_flux_pipeline, fill)
    config_path = os.path.join(fill, "transformer", "config.json")
    config = json.load(open(config_path))
    config["in_channels"] = 128  # as FLUX.1-Canny: latents and the control image's, not 4 x the VAE's 16 channels
    json.dump(config, open(config_path, "w"))
    assert "takes 128 input channels, not the 64 of packed latents" in refused(flow_args(fill, train_images, out))
    # with the real VAE's 8x downsampling, 2x2 patches need sides that are multiples of 16
    eight = str(tmp_path / "eight")
    shutil.copytree(tiny_flux_pipeline, eight)
    vae_path = os.path.join(eight, "vae", "config.json")
    vae = json.load(open(vae_path))
    vae["block_out_channels"] = [8, 8, 8, 8]
    json.dump(vae, open(vae_path, "w"))
    assert "--resolution 40 gives latents the Flux.1 transformer cannot patch: use a multiple of 16" in refused(
        flow_args(eight, train_images, out, resolution=40))
