"""Which step is the good one? The validation loss on held-out images (both trainers' shared core, the PyTorch
trainer end to end), eval.json / eval.png, and their bad input. One trained run is shared by the module."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import assert_within_eps, base_args, run_script, write_images
from test_bad_input import bad_args, refusal
from textual_inversion_core import eval_record, validation
from textual_inversion_core.cli import parse_args
from textual_inversion_core.data import TextualInversionDataset
from textual_inversion_core.errors import UserError

SETTINGS = dict(max_train_steps=6, save_steps=3, checkpointing_steps=3, validation_split=0.25, validate_every_n_steps=2)


@pytest.fixture(scope="module")
def validated_run(tiny_pipeline, train_images, tmp_path_factory):
    """6 steps on 3 of the 4 images (one held out), embeddings and checkpoints at 3 and 6, the loss at 2, 3, 4, 6."""
    out = str(tmp_path_factory.mktemp("eval") / "run")
    result = run_script(base_args(tiny_pipeline, train_images, out, **SETTINGS), check=True)
    return out, result


def read_record(out):
    with open(os.path.join(out, eval_record.FILE), encoding="utf-8") as f:
        return json.load(f)


def test_eval_json_has_the_loss_at_save_steps_every_n_steps_and_the_last(validated_run):
    out, result = validated_run
    record = read_record(out)
    steps = record["steps"]
    assert sorted(steps, key=int) == ["2", "3", "4", "6"]
    assert steps["3"]["embedding"] == "learned_embeds-steps-3.safetensors" and "embedding" not in steps["2"]
    assert record["final_step"] == 6
    assert record["validation"]["draws"] == validation.DRAWS_PER_IMAGE  # one image held out, 10 draws
    assert record["validation"]["images"] == ["image_0.png"]
    assert "images = 3" in result.stderr  # the held-out image left the training set
    baselines = {entry["validation_baseline"] for entry in steps.values()}
    assert len(baselines) == 1  # the initializer's loss does not depend on the vectors
    losses = [steps[s]["validation_loss"] for s in ("2", "3", "4", "6")]
    assert all(np.isfinite(losses)) and len(set(losses)) == 4  # the vectors move, so does their loss
    # eval.png beside it, and both paths named at the end of the log
    with Image.open(os.path.join(out, eval_record.PLOT)) as plot:
        assert plot.format == "PNG" and plot.size[0] >= 500
    assert os.path.join(out, "eval.json") in result.stderr and os.path.join(out, "eval.png") in result.stderr


def test_resume_keeps_the_scores_of_steps_already_measured(validated_run, tiny_pipeline, train_images, tmp_path):
    """Resumed from checkpoint-3: the entries of steps 2 and 3 are kept as they are in eval.json (step 2 is
    marked here to show it is not measured again), steps 4 and 6 are measured again, equal to the
    uninterrupted run's (the draws are fixed; the baseline, measured in the other process, to a few float32 ulps:
    MKL's float32 kernels may round differently with another memory alignment; measured 0 to 2.4e-8 on 1.08)."""
    out, _ = validated_run
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(out, "checkpoint-3"), os.path.join(part, "checkpoint-3"))
    shutil.copy(os.path.join(out, "learned_embeds-steps-3.safetensors"), part)
    record = read_record(out)
    record["steps"] = {k: v for k, v in record["steps"].items() if int(k) <= 3}
    record["steps"]["2"]["validation_loss"] = 123.0
    with open(os.path.join(part, eval_record.FILE), "w") as f:
        json.dump(record, f)
    run_script(base_args(tiny_pipeline, train_images, part, resume_from_checkpoint="latest", **SETTINGS), check=True)
    resumed, uninterrupted = read_record(part)["steps"], read_record(out)["steps"]
    assert resumed["2"]["validation_loss"] == 123.0
    assert resumed["3"] == uninterrupted["3"]
    for step in ("4", "6"):  # the resumed vectors differ from the uninterrupted ones by up to 5e-8 (AdamW on resume)
        assert resumed[step]["validation_loss"] == pytest.approx(uninterrupted[step]["validation_loss"], abs=1e-6), step
        assert_within_eps(resumed[step]["validation_baseline"], uninterrupted[step]["validation_baseline"], 4,
                          what=f"baseline at step {step}")


def test_resume_with_other_held_out_images_is_refused(validated_run, tiny_pipeline, train_images, tmp_path):
    out, _ = validated_run
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(out, "checkpoint-3"), os.path.join(part, "checkpoint-3"))
    shutil.copy(os.path.join(out, eval_record.FILE), part)
    result = run_script(base_args(tiny_pipeline, train_images, part, resume_from_checkpoint="latest",
                                  **dict(SETTINGS, validation_seed=3)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].endswith("or use a new --output_dir"), result.stderr[-2000:]
    assert "the held-out images (image_" in result.stderr


# --------------------------------------------------------------------------------------------------
# The held-out split and the fixed draws (core, no model)


def test_split_is_keyed_disjoint_and_keeps_a_training_image():
    paths = [f"img{i}.png" for i in range(10)]
    train, held = validation.split_images(paths, 0.2, seed=5)
    assert len(held) == 2 and sorted(train + held) == paths and not set(train) & set(held)
    assert validation.split_images(paths, 0.2, seed=5) == (train, held)  # the same split every time
    assert any(validation.split_images(paths, 0.2, seed=s)[1] != held for s in range(6, 12))  # the seed picks them
    assert len(validation.split_images(paths, 0.01, seed=5)[1]) == 1  # at least one image
    with pytest.raises(UserError, match="leaves no training image"):
        validation.split_images(paths[:1], 0.5, seed=0)


def test_spread_timesteps_cover_the_training_range():
    assert validation.spread_timesteps(0, 1000) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert validation.spread_timesteps(200, 1000, 4) == [300, 500, 700, 900]


class FakeTokenizer:
    model_max_length, pad_token_id = 8, 0

    def __call__(self, prompts, padding=None, truncation=None, max_length=None, verbose=None):
        class Out:
            input_ids = [[hash(w) % 1000 + 1 for w in p.split()][:8] + [0] * (8 - min(8, len(p.split()))) for p in prompts]
        return Out()


def make_loss(folder, seed, calls):
    dataset = TextualInversionDataset(folder, size=32, repeats=1, seed=seed, placeholder_token="<t>")

    def encode(pixels):
        calls.append(len(pixels))
        return [p[:1, ::8, ::8] * 0 + 1 for p in pixels], [p[:1, ::8, ::8] * 0 + 0.5 for p in pixels]

    return validation.ValidationLoss(dataset, [FakeTokenizer()], ["<t>"], "toy", encode, (0, 1000), chunk=3)


def test_draws_are_fixed_and_the_baseline_uses_the_initializer_rows(tmp_path):
    folder = write_images(tmp_path / "held", count=2, size=(32, 32))
    calls = []
    first, again, other = make_loss(folder, 1, calls), make_loss(folder, 1, []), make_loss(folder, 2, [])
    assert sum(calls) == 4  # every held-out picture (2 images x 2 flips at most) encoded when the set is built
    assert first.num_draws == 2 * validation.DRAWS_PER_IMAGE
    for a, b in zip(first.batches, again.batches):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a["noise_seed"], b["noise_seed"]) for a, b in zip(first.batches, other.batches))
    timesteps = np.concatenate([b["timestep"][0] for b in first.batches])
    assert sorted(timesteps.tolist()) == sorted(validation.spread_timesteps(0, 1000) * 2)
    # loss_of sees the token's rows, then (once, for the baseline) the initializer's rows of the same draws
    seen = []

    def loss_of(batch, prompt_ids):
        rows = batch["prompt"][0]
        seen.append(rows.copy())
        return float(np.mean([prompt_ids[0][r].sum() for r in rows]))

    values = first.measure(loss_of)
    n = len(first.batches)
    assert len(seen) == 2 * n and all(np.array_equal(b - first.baseline_offset, a) for a, b in zip(seen[n:], seen[:n]))
    assert values["validation_baseline"] != values["validation_loss"]
    first.measure(loss_of)
    assert len(seen) == 3 * n  # the baseline is not measured again


def test_eval_record_merges_and_keeps(tmp_path):
    record = eval_record.EvalRecord(str(tmp_path))
    record.update(5, {"validation_loss": 1.0, "reconstruction": 0.5})
    again = eval_record.EvalRecord(str(tmp_path))
    again.update(5, {"validation_loss": 2.0, "reconstruction": 0.9}, keep=True)
    again.update(5, {"validation_loss": 3.0})
    assert eval_record.EvalRecord(str(tmp_path)).steps == {5: {"validation_loss": 3.0, "reconstruction": 0.5}}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_eval_plot_with_scores_has_two_panels(tmp_path):
    entries = {s: {"validation_loss": 1.0 - s / 100, "validation_baseline": 1.0, "reconstruction": 0.5 + s / 100,
                   "editability": 0.3 - s / 200} for s in (10, 20, 30)}
    with Image.open(eval_record.plots.write_eval_plot(str(tmp_path / "a.png"), entries)) as both:
        two = both.size
    with Image.open(eval_record.plots.write_eval_plot(str(tmp_path / "b.png"),
                                                      {10: {"validation_loss": 1.0}})) as one:
        assert one.size[0] * 2 == two[0]


# --------------------------------------------------------------------------------------------------
# Bad input, one line before any model loads


@pytest.mark.parametrize("overrides, needles", [
    (dict(validation_split=1.5), ("--validation_split", "between 0 and 1")),
    (dict(validation_split=0.2, validation_data_dir="."), ("pass one of them",)),
    (dict(validate_every_n_steps=5), ("--validate_every_n_steps", "--validation_split")),
    (dict(validation_split=0.2, validate_every_n_steps=0), ("--validate_every_n_steps must be at least 1",)),
    (dict(validation_data_dir="no-such-folder"), ("--validation_data_dir", "is not a folder")),
])
def test_bad_validation_flags(tiny_pipeline, train_images, tmp_path, capsys, overrides, needles):
    refusal(bad_args(tiny_pipeline, train_images, str(tmp_path / "out"), **overrides), capsys, *needles)


def test_validation_split_that_leaves_no_training_image(tiny_pipeline, tmp_path, capsys, no_model_loading):
    data = write_images(tmp_path / "one", count=1)
    refusal(bad_args(tiny_pipeline, data, str(tmp_path / "out"), validation_split=0.5), capsys,
            "--validation_split 0.5 of 1 image(s) leaves no training image")


def test_validation_data_dir_that_is_the_training_folder(tiny_pipeline, train_images, tmp_path, capsys):
    refusal(bad_args(tiny_pipeline, train_images, str(tmp_path / "out"), validation_data_dir=train_images), capsys,
            "--validation_data_dir is --train_data_dir itself")


def test_validation_seed_defaults_to_seed_then_zero():
    def args(**flags):
        argv = ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--placeholder_token=<t>",
                "--initializer_token=toy"] + [f"--{k}={v}" for k, v in flags.items()]
        return parse_args(argv)

    assert validation.validation_seed(args()) == 0
    assert validation.validation_seed(args(seed=4)) == 4
    assert validation.validation_seed(args(seed=4, validation_seed=9)) == 9
