"""The paper's scores (reconstruction, editability) of saved steps with a CLIP model, in training and with the
standalone command, and --select_best. One scored run (tiny pipeline at 32 px, a tiny random CLIP, 1 sample per
prompt, 2 sampler steps) is shared by the module; an SDXL run (both vector sets, text encoders stored in fp16) is
scored both ways too."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from helpers import REPO, base_args, run_script, script_env
from test_bad_input import bad_args, refusal
from textual_inversion_core import best, eval_record, evaluate
from textual_inversion_core.errors import UserError

SCORING = dict(max_train_steps=4, save_steps=2, checkpointing_steps=2, resolution=32, validation_split=0.25,
               eval_num_samples=1, eval_inference_steps=2, select_best="balanced")
SCORES = ("reconstruction", "editability", "samples")


@pytest.fixture(scope="module")
def scored_run(tiny_pipeline, train_images, tiny_clip, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scores") / "run")
    result = run_script(base_args(tiny_pipeline, train_images, out, eval_clip_model=tiny_clip, **SCORING), check=True)
    return out, result


def record_of(out):
    with open(os.path.join(out, eval_record.FILE), encoding="utf-8") as f:
        return json.load(f)


def evaluate_command(out, *flags, check=True):
    command = [sys.executable, "-m", "textual_inversion_core.evaluate", out] + [str(f) for f in flags]
    result = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def strip_scores(out):
    """The run's folder as if trained without --eval_clip_model / --select_best: eval.json without scores."""
    record = record_of(out)
    record.pop("initializer")
    record.pop("best")
    for entry in record["steps"].values():
        for key in SCORES:
            entry.pop(key)
    with open(os.path.join(out, eval_record.FILE), "w") as f:
        json.dump(record, f)
    for name in os.listdir(out):
        if "-best" in name:
            os.unlink(os.path.join(out, name))


def test_scored_in_training(scored_run):
    out, result = scored_run
    record = record_of(out)
    steps = record["steps"]
    assert sorted(steps, key=int) == ["2", "4"]
    for entry in list(steps.values()) + [record["initializer"]]:
        assert -1 <= entry["reconstruction"] <= 1 and -1 <= entry["editability"] <= 1
        assert entry["samples"] == 1 + len(evaluate.EDIT_PROMPTS["object"])
    assert steps["2"]["reconstruction"] != steps["4"]["reconstruction"]
    with Image.open(os.path.join(out, "eval.png")) as plot:  # the loss curve and the paper's figure side by side
        assert plot.size[0] == 2 * 560


def test_standalone_command_equals_the_scores_of_training(scored_run, tiny_clip, tmp_path):
    """The same files scored again afterwards (settings read back from eval.json): the same numbers."""
    out, _ = scored_run
    again = str(tmp_path / "again")
    shutil.copytree(out, again)
    strip_scores(again)
    result = evaluate_command(again, "--eval_clip_model", tiny_clip)
    assert os.path.join(again, "eval.png") in result.stdout
    trained, scored = record_of(out), record_of(again)
    for step in ("2", "4"):
        for key in SCORES:
            assert scored["steps"][step][key] == pytest.approx(trained["steps"][step][key], abs=1e-9), (step, key)
    assert scored["initializer"] == pytest.approx(trained["initializer"], abs=1e-9)


def test_standalone_keeps_steps_already_scored_and_scores_new_ones(scored_run, tiny_clip, tmp_path):
    """Step 2's scores are kept as eval.json has them (marked: not sampled again); step 4, unscored, gets the
    training run's numbers; --select_best from the command writes the best files."""
    out, _ = scored_run
    again = str(tmp_path / "again")
    shutil.copytree(out, again)
    record = record_of(again)
    record["steps"]["2"]["reconstruction"] = 0.999
    for key in SCORES:
        record["steps"]["4"].pop(key)
    with open(os.path.join(again, eval_record.FILE), "w") as f:
        json.dump(record, f)
    result = evaluate_command(again, "--eval_clip_model", tiny_clip, "--select_best", "reconstruction")
    scored = record_of(again)
    assert scored["steps"]["2"]["reconstruction"] == 0.999
    assert scored["steps"]["4"]["reconstruction"] == pytest.approx(record_of(out)["steps"]["4"]["reconstruction"],
                                                                   abs=1e-9)
    assert scored["best"]["step"] == 2 and scored["best"]["rule"] == "reconstruction"  # 0.999 beats step 4
    assert "--select_best reconstruction: step 2" in result.stderr


def test_best_files_are_the_chosen_steps(scored_run):
    out, result = scored_run
    record = record_of(out)
    chosen = record["best"]["step"]
    entries = {int(k): v for k, v in record["steps"].items()}
    assert (chosen, record["best"]["reason"]) == best.choose(entries, "balanced", record["initializer"])
    assert f"--select_best balanced: step {chosen}," in result.stderr
    expected = load_file(os.path.join(out, f"learned_embeds-steps-{chosen}.safetensors"))["<cat-toy>"]
    assert np.array_equal(load_file(os.path.join(out, "learned_embeds-best.safetensors"))["<cat-toy>"], expected)
    bin_file = torch.load(os.path.join(out, "learned_embeds-best.bin"), weights_only=True)
    assert np.array_equal(bin_file["<cat-toy>"].numpy(), expected)
    webui = torch.load(os.path.join(out, "cat-toy-best.pt"), weights_only=True)
    assert np.array_equal(webui["string_to_param"]["*"].numpy(), expected) and webui["step"] == chosen
    assert np.array_equal(load_file(os.path.join(out, "cat-toy-best.safetensors"))["emb_params"], expected)
    assert sorted(record["best"]["files"]) == sorted(["learned_embeds-best.bin", "learned_embeds-best.safetensors",
                                                      "cat-toy-best.pt", "cat-toy-best.safetensors"])
    assert f"step {chosen}" in best.best_note(out)  # the model card's sentence


# --------------------------------------------------------------------------------------------------
# The rules (core, no model)

ENTRIES = {
    100: {"embedding": "a", "validation_loss": 0.30, "reconstruction": 0.60, "editability": 0.30},
    200: {"embedding": "b", "validation_loss": 0.25, "reconstruction": 0.70, "editability": 0.28},
    300: {"embedding": "c", "validation_loss": 0.27, "reconstruction": 0.80, "editability": 0.20},
    400: {"validation_loss": 0.10, "reconstruction": 0.99, "editability": 0.99},  # no file: never chosen
}


def test_rules():
    assert best.choose(ENTRIES, "validation_loss")[0] == 200
    assert best.choose(ENTRIES, "reconstruction")[0] == 300
    assert best.choose(ENTRIES, "editability")[0] == 100
    # balanced: editability at least 90 % of the initializer's 0.30 (0.27): steps 100 and 200; 200 reconstructs best
    step, reason = best.choose(ENTRIES, "balanced", {"editability": 0.30})
    assert step == 200 and "0.2700" in reason and "initializer" in reason
    # without the initializer's scores the earliest scored step is the reference (the same here)
    assert best.choose(ENTRIES, "balanced")[0] == 200
    # nobody within the margin: the most editable
    step, reason = best.choose(ENTRIES, "balanced", {"editability": 0.9})
    assert step == 100 and "no step keeps" in reason
    with pytest.raises(UserError, match="no saved step"):
        best.choose({1: {"validation_loss": 1.0}}, "validation_loss")


def test_edit_prompts_are_scored_without_the_token():
    assert evaluate.without_token("a photo of {} on the beach") == "a photo of on the beach"
    for prompts in evaluate.EDIT_PROMPTS.values():
        assert all("{}" in p for p in prompts) and len(prompts) == 4


# --------------------------------------------------------------------------------------------------
# Bad input, one line before any model loads


@pytest.mark.parametrize("overrides, needles", [
    (dict(select_best="balanced", save_steps=5), ("--select_best balanced needs the CLIP scores", "--eval_clip_model")),
    (dict(select_best="validation_loss", save_steps=5), ("--select_best validation_loss needs held-out images",)),
    (dict(select_best="validation_loss", validation_split=0.25, save_steps=0), ("none is saved", "--save_steps")),
    (dict(eval_clip_model="CLIP", eval_num_samples=0), ("--eval_num_samples must be at least 1",)),
])
def test_bad_scoring_flags(tiny_pipeline, train_images, tmp_path, capsys, overrides, needles):
    if overrides.get("eval_clip_model") == "CLIP":
        overrides["eval_clip_model"] = tiny_pipeline
    refusal(bad_args(tiny_pipeline, train_images, str(tmp_path / "out"), **overrides), capsys, *needles)


def test_clip_folder_that_is_not_clip(tiny_pipeline, train_images, tmp_path, capsys):
    refusal(bad_args(tiny_pipeline, train_images, str(tmp_path / "out"), eval_clip_model=tiny_pipeline), capsys,
            "--eval_clip_model", "is not a CLIP model folder", "no readable config.json")
    text_encoder = os.path.join(tiny_pipeline, "text_encoder")
    refusal(bad_args(tiny_pipeline, train_images, str(tmp_path / "out"), eval_clip_model=text_encoder), capsys,
            "is not a CLIP model folder", "model_type 'clip_text_model'")


def test_standalone_bad_input(tmp_path, tiny_clip, tiny_pipeline):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    result = evaluate_command(empty, "--eval_clip_model", tiny_clip, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "pass --pretrained_model_name_or_path"), result.stderr[-2000:]
    result = evaluate_command(empty, "--eval_clip_model", tiny_pipeline, "--pretrained_model_name_or_path",
                              tiny_pipeline, "--train_data_dir", empty, check=False)
    assert result.returncode == 2 and "is not a CLIP model folder" in result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# SDXL: both text encoders' vectors, scored in training and by the command


@pytest.fixture(scope="module")
def sdxl_fp16_text_encoders(tiny_sdxl_pipeline, tmp_path_factory):
    """The tiny SDXL pipeline with both text encoders stored in fp16 (weights and config "dtype"), as published SDXL
    checkpoints are: transformers loads such an encoder in fp16 unless told otherwise, diffusers its UNet and VAE in
    fp32."""
    from safetensors.numpy import save_file

    folder = str(tmp_path_factory.mktemp("pipelines") / "tiny-sdxl-fp16")
    shutil.copytree(tiny_sdxl_pipeline, folder)
    for name in ("text_encoder", "text_encoder_2"):
        path = os.path.join(folder, name, "model.safetensors")
        save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in load_file(path).items()}, path,
                  metadata={"format": "pt"})
        with open(os.path.join(folder, name, "config.json")) as f:
            config = json.load(f)
        config["dtype"] = config["torch_dtype"] = "float16"
        with open(os.path.join(folder, name, "config.json"), "w") as f:
            json.dump(config, f)
    return folder


def test_sdxl_scores_in_training_equal_the_standalone_commands(sdxl_fp16_text_encoders, train_images, tiny_clip,
                                                               tmp_path):
    out = str(tmp_path / "run")
    result = run_script(base_args(sdxl_fp16_text_encoders, train_images, out, eval_clip_model=tiny_clip,
                                  **dict(SCORING, max_train_steps=2, save_steps=1, checkpointing_steps=0,
                                         validation_split=None, select_best="reconstruction")), check=True)
    assert "model = SDXL, trained: clip_l (text_encoder), clip_g (text_encoder_2)" in result.stderr
    trained = record_of(out)
    assert sorted(trained["steps"], key=int) == ["1", "2"]
    chosen = trained["best"]["step"]
    for name in ("learned_embeds", "learned_embeds_2"):  # the pick's files: both vector sets
        assert np.array_equal(load_file(os.path.join(out, f"{name}-best.safetensors"))["<cat-toy>"],
                              load_file(os.path.join(out, f"{name}-steps-{chosen}.safetensors"))["<cat-toy>"])
    again = str(tmp_path / "again")
    shutil.copytree(out, again)
    strip_scores(again)
    evaluate_command(again, "--eval_clip_model", tiny_clip)
    scored = record_of(again)
    for step in ("1", "2"):
        for key in SCORES:
            assert scored["steps"][step][key] == pytest.approx(trained["steps"][step][key], abs=1e-9), (step, key)
    assert scored["initializer"] == pytest.approx(trained["initializer"], abs=1e-9)
    assert trained["steps"]["1"]["reconstruction"] != trained["steps"]["2"]["reconstruction"]
