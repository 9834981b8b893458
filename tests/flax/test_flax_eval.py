"""The Flax trainer measures the validation loss as the PyTorch one does (textual_inversion_core.validation):
eval.json and eval.png written, the same numbers on 2 devices as on 1, kept and measured alike on resume,
--select_best validation_loss; --eval_clip_model is refused, pointing at the scoring command."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import flax_base_args, run_flax, run_flax_in_process

SETTINGS = dict(max_train_steps=4, save_steps=2, checkpointing_steps=2, validation_split=0.25)
# The 2-device run's vectors differ from the 1-device run's by summation order (~1e-7): the loss (~1.1) by less.
LOSS_TOLERANCE = 1e-6


def steps_of(out):
    with open(os.path.join(out, "eval.json"), encoding="utf-8") as f:
        return json.load(f)["steps"]


@pytest.mark.slow
def test_flax_validation_loss_on_devices_and_resume(tiny_pipeline, train_images, compile_cache, tmp_path):
    one, two, part = (str(tmp_path / name) for name in ("one", "two", "part"))
    proc = run_flax_in_process(flax_base_args(tiny_pipeline, train_images, one, train_batch_size=2,
                                              select_best="validation_loss", **SETTINGS), cache=compile_cache)
    assert "images = 3" in proc.stderr and os.path.join(one, "eval.png") in proc.stderr
    # --select_best validation_loss: the lowest loss's step, its vectors as the best files in every format
    record = json.load(open(os.path.join(one, "eval.json")))
    losses = {int(s): e["validation_loss"] for s, e in record["steps"].items()}
    chosen = min(losses, key=losses.get)
    assert record["best"]["step"] == chosen and f"--select_best validation_loss: step {chosen}," in proc.stderr
    best = load_file(os.path.join(one, "learned_embeds-best.safetensors"))["<cat-toy>"]
    assert np.array_equal(best, load_file(os.path.join(one, f"learned_embeds-steps-{chosen}.safetensors"))["<cat-toy>"])
    assert os.path.isfile(os.path.join(one, "cat-toy-best.pt")) and os.path.isfile(os.path.join(one, "cat-toy-best.safetensors"))
    run_flax(flax_base_args(tiny_pipeline, train_images, two, train_batch_size=1, **SETTINGS), devices=2,
             cache=compile_cache)
    single, double = steps_of(one), steps_of(two)
    assert sorted(single) == sorted(double) == ["2", "4"]
    assert single["2"]["embedding"] == "learned_embeds-steps-2.safetensors"
    assert single["2"]["validation_baseline"] == single["4"]["validation_baseline"]
    assert single["2"]["validation_loss"] != single["4"]["validation_loss"]
    for step in single:
        for key in ("validation_loss", "validation_baseline"):
            assert abs(single[step][key] - double[step][key]) <= LOSS_TOLERANCE, (step, key)

    os.makedirs(part)
    shutil.copytree(os.path.join(one, "checkpoint-2"), os.path.join(part, "checkpoint-2"))
    record = json.load(open(os.path.join(one, "eval.json")))
    record["steps"] = {"2": dict(record["steps"]["2"], validation_loss=123.0)}  # kept, not measured again
    json.dump(record, open(os.path.join(part, "eval.json"), "w"))
    run_flax_in_process(flax_base_args(tiny_pipeline, train_images, part, train_batch_size=2,
                                       resume_from_checkpoint="latest", **SETTINGS), cache=compile_cache)
    resumed = steps_of(part)
    assert resumed["2"]["validation_loss"] == 123.0
    assert abs(resumed["4"]["validation_loss"] - single["4"]["validation_loss"]) <= LOSS_TOLERANCE
    assert resumed["4"]["validation_baseline"] == single["4"]["validation_baseline"]


def test_flax_refuses_eval_clip_model_and_points_at_the_command(tiny_pipeline, train_images, tmp_path):
    import textual_inversion_flax as ti_flax
    from textual_inversion_core.errors import UserError

    clip = str(tmp_path / "clip")  # checked by check_flags before anything reads it
    with pytest.raises(UserError, match=r"python -m textual_inversion_core.evaluate OUTPUT_DIR --eval_clip_model"):
        ti_flax.main(flax_base_args(tiny_pipeline, train_images, str(tmp_path / "out"), eval_clip_model=clip))

