"""The opt-in training controls in the PyTorch trainer (README "Training controls"): --snr_gamma, --noise_offset,
--min_timestep/--max_timestep, --preserve_embedding_norm, --max_embedding_norm, and the embedding_norm logging.

Formulas are checked directly (against diffusers' compute_snr and the numpy references in
textual_inversion_core.controls); five short runs on the tiny pipelines check the wiring: a capped run, an SDXL
run with every other control and its resume, and a run with neutral values of the flags against one without.
"""

import os
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from helpers import base_args, read_vectors, run_in_process
from test_logging import read_events
from textual_inversion_core import controls, run
from textual_inversion_core.cli import build_parser
from textual_inversion_core.errors import UserError
from torch_backend import ddpm
from torch_backend import model as tm

GAMMA = 5.0


def scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def diffusers_weights(noise_scheduler, timesteps, gamma):
    """The weights exactly as diffusers' examples/text_to_image/train_text_to_image.py computes them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)


# --------------------------------------------------------------------------------------------------
# Formulas


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_and_the_numpy_reference(prediction_type):
    sched = scheduler(prediction_type)
    timesteps = torch.tensor([0, 1, 50, 150, 250, 400, 700, 999])
    ours = ddpm.min_snr_weights(sched, timesteps, GAMMA)
    assert torch.equal(ours, diffusers_weights(sched, timesteps, GAMMA))
    reference = controls.min_snr_weights(controls.snr(sched.alphas_cumprod.numpy(), timesteps.numpy()), GAMMA,
                                         prediction_type)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-6)
    assert ours.min() < 0.1 and (ours[-1] == 1 if prediction_type == "epsilon" else ours[-1] < 0.01)
    # gamma above every SNR: the epsilon weights are all 1 (the plain MSE); v_prediction's are snr / (snr + 1)
    if prediction_type == "epsilon":
        assert torch.equal(ddpm.min_snr_weights(sched, timesteps, 1e9), torch.ones(len(timesteps)))
    # a zero SNR (zero-terminal-SNR schedules) gives epsilon its limit 1, not diffusers' 0/0
    assert controls.min_snr_weights(np.array([0.0, 2.0], np.float32), GAMMA, "epsilon").tolist() == [1.0, 1.0]


class StubUNet(torch.nn.Module):
    """Stands in for the UNet: a prediction that depends on the input and the conditioning."""

    def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return types.SimpleNamespace(sample=0.7 * sample + encoder_hidden_states.mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_loss_is_the_mean_of_weighted_per_example_mse_also_masked(prediction_type):
    sched, unet = scheduler(prediction_type), StubUNet()
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 6, 6, generator=g), torch.randn(4, 4, 6, 6, generator=g)
    hidden, timesteps = torch.randn(4, 3, 8, generator=g), torch.tensor([3, 120, 500, 990])
    pred = unet(sched.add_noise(latents, noise, timesteps), timesteps, hidden).sample
    target = sched.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    weights = diffusers_weights(sched, timesteps, GAMMA)
    expected = (F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3]) * weights).mean()
    args = (unet, sched, latents, noise, timesteps, hidden, None, torch.float32)
    torch.testing.assert_close(ddpm.prediction_loss(*args, snr_gamma=GAMMA), expected, rtol=1e-6, atol=0)
    # without the flag: diffusers' plain MSE, the very expression it always was
    assert torch.equal(ddpm.prediction_loss(*args), F.mse_loss(pred, target))
    # masked: each example's masked MSE times its weight; all-ones is the unmasked weighted loss
    mask = (torch.rand(4, 1, 6, 6, generator=g) > 0.5).float()
    per_example = tm.masked_mse_per_example(pred, target, mask)
    torch.testing.assert_close(ddpm.prediction_loss(*args, mask=mask, snr_gamma=GAMMA), (per_example * weights).mean(),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(ddpm.prediction_loss(*args, mask=torch.ones(4, 1, 6, 6), snr_gamma=GAMMA), expected,
                               rtol=1e-6, atol=0)


def fake_batch(seeds, shape=(4, 8, 8)):
    n = len(seeds)
    return {"mean": np.zeros((1, n) + shape, np.float32), "std": np.ones((1, n) + shape, np.float32),
            "noise_seed": np.array([seeds], np.uint64), "prompt": np.zeros((1, n), np.int64),
            "time_ids": np.zeros((1, n, 6), np.int64)}


def draws(seeds, timestep_range=(0, 1000), noise_offset=0.0):
    latents, noise, timesteps, *_ = ddpm.device_batch(fake_batch(seeds), 0, [torch.zeros((1, 77), dtype=torch.long)],
                                                    timestep_range, 0.18215, "cpu", noise_offset)
    return latents, noise, timesteps


def test_noise_offset_adds_a_constant_per_example_and_channel_from_the_examples_own_draw():
    seeds = [11, 22, 33]
    _, plain, t_plain = draws(seeds)
    latents, offset, t_offset = draws(seeds, noise_offset=0.1)
    assert torch.equal(t_plain, t_offset) and torch.equal(latents, draws(seeds)[0])  # earlier draws unchanged
    added = offset - plain
    per_channel = added[:, :, :1, :1]
    torch.testing.assert_close(added, per_channel.expand_as(added), rtol=0, atol=1e-6)  # constant over h, w
    assert per_channel.abs().min() > 0 and per_channel.flatten(1).std(1).min() > 0  # differs between channels
    assert 0.02 < per_channel.abs().mean() < 0.2  # 0.1 x a standard normal
    # keyed by the example: the same noise_seed gives the same draw wherever it sits in a batch, with any partners
    # (what N processes and a resume rely on)
    alone = draws([22], noise_offset=0.1)[1][0]
    elsewhere = draws([99, 7, 22, 5], noise_offset=0.1)[1][2]
    assert torch.equal(alone, offset[1]) and torch.equal(elsewhere, offset[1])
    # off: exactly the draws of before the controls: eps, noise, then a timestep in [0, 1000) from each example's
    # own generator
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    eps = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])
    before = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])
    t_before = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
    assert torch.equal(plain, before) and torch.equal(t_plain, t_before)
    assert torch.equal(draws(seeds)[0], eps * 0.18215)  # mean 0, std 1


def test_timesteps_fall_in_the_range_and_are_keyed_by_example():
    seeds = list(range(200))
    timesteps = draws(seeds, (100, 110))[2]
    assert timesteps.min() >= 100 and timesteps.max() <= 109
    assert set(timesteps.tolist()) == set(range(100, 110))  # every value of [min, max) occurs, max never
    assert draws([57], (100, 110))[2].item() == timesteps[57].item()
    assert draws(seeds, (999, 1000))[2].eq(999).all()


def test_norm_controls_match_the_reference_and_leave_vectors_under_the_cap_untouched():
    g = torch.Generator().manual_seed(3)
    start = torch.randn(3, 16, generator=g)
    moved = [start * torch.tensor([[2.0], [0.5], [1.0]]) + 0.01 * torch.randn(3, 16, generator=g)]
    targets = controls.vector_norms(start.numpy())
    preserved = [moved[0].clone()]
    tm.apply_norm_control(preserved, "preserve", [targets])
    np.testing.assert_allclose(controls.vector_norms(preserved[0].numpy()), targets, rtol=1e-6)
    np.testing.assert_allclose(preserved[0].numpy(), controls.apply_norm_control(moved[0].numpy(), "preserve", targets),
                               rtol=1e-6, atol=1e-7)
    assert torch.allclose(preserved[0] / preserved[0].norm(dim=1, keepdim=True), moved[0] / moved[0].norm(dim=1, keepdim=True))
    cap = float(np.median(controls.vector_norms(moved[0].numpy())))
    capped = [moved[0].clone()]
    tm.apply_norm_control(capped, "cap", max_norm=cap)
    norms = controls.vector_norms(capped[0].numpy())
    assert norms.max() <= cap * (1 + 1e-6)
    under = controls.vector_norms(moved[0].numpy()) <= cap
    assert under.any() and torch.equal(capped[0][torch.from_numpy(under)], moved[0][torch.from_numpy(under)])
    np.testing.assert_allclose(capped[0].numpy(), controls.apply_norm_control(moved[0].numpy(), "cap", max_norm=cap),
                               rtol=1e-6)
    zero = [torch.zeros(2, 4)]
    tm.apply_norm_control(zero, "preserve", [np.ones(2, np.float32)])
    assert torch.equal(zero[0], torch.zeros(2, 4))  # no direction to scale: stays zero, no NaN


def test_loss_log_carries_extra_values_and_fetches_them_with_the_losses_at_once():
    log = run.LossLog()
    calls = []

    def to_host(values):
        calls.append(len(values))
        return values

    log.add(1, 0.5, 1e-3, {"embedding_norm": 0.25, "embedding_norm_2": 0.75})
    log.add(2, 0.4, 1e-3, {"embedding_norm": 0.3, "embedding_norm_2": 0.8})
    assert log.fetch(to_host) == [(1, 0.5, 1e-3, {"embedding_norm": 0.25, "embedding_norm_2": 0.75}),
                                  (2, 0.4, 1e-3, {"embedding_norm": 0.3, "embedding_norm_2": 0.8})]
    assert calls == [6] and log.history == [(1, 0.5), (2, 0.4)]
    assert run.norm_postfix(log.last_extras) == {"norm": "0.3000", "norm_2": "0.8000"}
    assert controls.norm_log_keys(2) == ["embedding_norm", "embedding_norm_2"]


def test_help_says_whose_flag_each_control_is():
    helps = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    assert helps["--snr_gamma"].startswith("(diffusers' train_text_to_image.py; kohya's --min_snr_gamma)")
    assert helps["--noise_offset"].startswith("(diffusers, kohya)")
    assert helps["--min_timestep"].startswith("(kohya)") and helps["--max_timestep"].startswith("(kohya)")
    assert helps["--preserve_embedding_norm"].startswith("(OneTrainer)")
    assert helps["--max_embedding_norm"].startswith("(ours)")


@pytest.mark.parametrize("flags, needle", [
    (dict(min_timestep=500, max_timestep=100), "--min_timestep 500 must be below --max_timestep 100"),
    (dict(min_timestep=-1), "--min_timestep must be 0 or more, got -1"),
    (dict(max_timestep=0), "--max_timestep must be at least 1"),
    (dict(max_timestep=1001), "--max_timestep 1001 is above the model's 1000 training timesteps"),
    (dict(min_timestep=1000), "--min_timestep 1000 leaves no timestep"),
    (dict(snr_gamma=-1), "--snr_gamma must be a positive number"),
    (dict(noise_offset=-0.1), "--noise_offset must be 0 (off) or more"),
    (dict(max_embedding_norm=0), "--max_embedding_norm must be a positive number"),
    (dict(preserve_embedding_norm=True, max_embedding_norm=1.0), "pass one of them"),
])
def test_bad_control_flags_are_one_line_before_any_model_loads(tiny_pipeline, train_images, tmp_path, flags, needle,
                                                               no_model_loading):
    import textual_inversion

    with pytest.raises(UserError) as info:
        textual_inversion.main(base_args(tiny_pipeline, train_images, str(tmp_path / "out"), **flags))
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_max_timestep_of_the_whole_range_is_accepted():
    args = build_parser().parse_args(["--pretrained_model_name_or_path=m", "--train_data_dir=d",
                                      "--placeholder_token=<t>", "--initializer_token=toy", "--max_timestep=1000"])
    controls.check_args(args)
    assert controls.from_args(args, 1000).timestep_range == (0, 1000)
    assert controls.from_args(build_parser().parse_args(["--pretrained_model_name_or_path=m", "--train_data_dir=d",
                                                         "--placeholder_token=<t>", "--initializer_token=toy"]),
                              500) == controls.Controls(max_timestep=500)


# --------------------------------------------------------------------------------------------------
# Runs


def initializer_rows(pipeline, folders):
    """The start vector ("toy"'s embedding row) of each text encoder."""
    from transformers import CLIPTokenizer

    rows = []
    for tokenizer_folder, encoder_folder in folders:
        toy = CLIPTokenizer.from_pretrained(pipeline, subfolder=tokenizer_folder).encode("toy", add_special_tokens=False)
        weights = load_file(os.path.join(pipeline, encoder_folder, "model.safetensors"))
        table = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
        rows.append(table[toy[0]])
    return rows


SD_FOLDERS = [("tokenizer", "text_encoder")]
SDXL_FOLDERS = SD_FOLDERS + [("tokenizer_2", "text_encoder_2")]
STEPS = 3
HIGH_LR = 0.5  # the vectors' norms move far in 3 steps without a control
CONTROLS = dict(snr_gamma=GAMMA, noise_offset=0.1, min_timestep=100, max_timestep=900, preserve_embedding_norm=True)


def norms_of(path):
    return controls.vector_norms(read_vectors(path))


def test_max_embedding_norm_caps_every_step_and_the_logged_norm_is_the_vectors(tiny_pipeline, train_images, tmp_path):
    start_norm = float(np.linalg.norm(initializer_rows(tiny_pipeline, SD_FOLDERS)[0]))
    cap = 1.05 * start_norm
    out = tmp_path / "capped"
    result = run_in_process(base_args(tiny_pipeline, train_images, str(out), max_train_steps=STEPS, learning_rate=HIGH_LR,
                                      num_vectors=2, save_steps=1, max_embedding_norm=cap, report_to="tensorboard",
                                      logging_steps=2))
    assert result.returncode == 0, result.stderr[-4000:]
    scalars, _ = read_events(out / "logs")
    assert [s for s, _ in scalars["embedding_norm"]] == list(range(1, STEPS + 1)) and "embedding_norm_2" not in scalars
    for step, logged in scalars["embedding_norm"]:
        norms = norms_of(out / f"learned_embeds-steps-{step}.safetensors")
        assert norms.max() <= cap * (1 + 1e-6), (step, norms, cap)
        np.testing.assert_allclose(logged, norms.mean(), rtol=1e-5)  # the mean norm of the step's vectors
    assert np.isclose(norms_of(out / "learned_embeds.safetensors"), cap, rtol=1e-5).any()  # the cap did bind
    assert "norm=" in result.stderr  # beside the loss in the progress bar


@pytest.fixture(scope="module")
def sdxl_controlled(tiny_sdxl_pipeline, train_images, tmp_path_factory):
    """An SDXL run with every other control (checkpoint after each step), and its checkpoint-1 resumed."""
    root = tmp_path_factory.mktemp("controls-sdxl")
    settings = dict(max_train_steps=STEPS, learning_rate=HIGH_LR, num_vectors=2, save_steps=1, checkpointing_steps=1,
                    **CONTROLS)
    full, resumed = root / "full", root / "resumed"
    result = run_in_process(base_args(tiny_sdxl_pipeline, train_images, str(full), report_to="tensorboard", **settings))
    assert result.returncode == 0, result.stderr[-4000:]
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    result = run_in_process(base_args(tiny_sdxl_pipeline, train_images, str(resumed), resume_from_checkpoint="latest",
                                      **settings))
    assert result.returncode == 0 and "resumed from" in result.stderr, result.stderr[-4000:]
    return full, resumed


def test_preserve_embedding_norm_keeps_each_vector_at_its_start_norm_sdxl(sdxl_controlled, tiny_sdxl_pipeline):
    full, _ = sdxl_controlled
    starts = initializer_rows(tiny_sdxl_pipeline, SDXL_FOLDERS)
    scalars, _ = read_events(full / "logs")
    for name, start, key in zip(("learned_embeds", "learned_embeds_2"), starts, ("embedding_norm", "embedding_norm_2")):
        start_norm = np.linalg.norm(start)
        for step in range(1, STEPS + 1):
            vectors = read_vectors(full / f"{name}-steps-{step}.safetensors")
            np.testing.assert_allclose(controls.vector_norms(vectors), start_norm, rtol=1e-5)
            assert np.abs(vectors - start).max() > 1e-2 * start_norm  # the direction did train
        assert [s for s, _ in scalars[key]] == list(range(1, STEPS + 1))
        np.testing.assert_allclose([v for _, v in scalars[key]], start_norm, rtol=1e-5)
        assert all(np.isfinite(v) for _, v in scalars["loss"])


def test_resume_with_the_controls_equals_the_uninterrupted_run(sdxl_controlled):
    full, resumed = sdxl_controlled
    for name in ("learned_embeds-steps-2.safetensors", "learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        np.testing.assert_array_equal(read_vectors(resumed / name), read_vectors(full / name))


def test_neutral_values_of_the_flags_train_exactly_what_no_flags_train(tiny_pipeline, train_images, tmp_path):
    """A cap no vector reaches, offset 0 and the whole timestep range: bit-identical to a run without the flags."""
    outs = []
    for name, flags in (("plain", {}), ("neutral", dict(max_embedding_norm=1e6, noise_offset=0.0, min_timestep=0,
                                                          max_timestep=1000))):
        out = tmp_path / name
        result = run_in_process(base_args(tiny_pipeline, train_images, str(out), max_train_steps=2, **flags))
        assert result.returncode == 0, result.stderr[-4000:]
        outs.append(out)
    assert read_vectors(outs[0] / "learned_embeds.safetensors").tobytes() == \
        read_vectors(outs[1] / "learned_embeds.safetensors").tobytes()
