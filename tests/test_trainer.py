"""What a user of diffusers' textual_inversion.py relies on, checked on the tiny offline pipeline."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, TORCH_SCRIPT, base_args, read_vectors, run_in_process, run_script

DIFFUSERS_FLAGS = """--save_steps --save_as_full_pipeline --num_vectors --pretrained_model_name_or_path --revision
--variant --tokenizer_name --train_data_dir --placeholder_token --initializer_token --learnable_property --repeats
--output_dir --seed --resolution --center_crop --train_batch_size --num_train_epochs --max_train_steps
--gradient_accumulation_steps --gradient_checkpointing --learning_rate --scale_lr --lr_scheduler --lr_warmup_steps
--lr_num_cycles --dataloader_num_workers --adam_beta1 --adam_beta2 --adam_weight_decay --adam_epsilon --push_to_hub
--hub_token --hub_model_id --logging_dir --mixed_precision --allow_tf32 --report_to --validation_prompt
--num_validation_images --validation_steps --validation_epochs --local_rank --checkpointing_steps
--checkpoints_total_limit --resume_from_checkpoint --enable_xformers_memory_efficient_attention
--no_safe_serialization""".split()


def test_help_lists_every_diffusers_flag_with_diffusers_defaults():
    result = subprocess.run([sys.executable, TORCH_SCRIPT, "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    listed = set(re.findall(r"--[a-z0-9_]+", result.stdout))
    assert set(DIFFUSERS_FLAGS) <= listed, set(DIFFUSERS_FLAGS) - listed

    from textual_inversion_core.cli import build_parser

    defaults = vars(build_parser().parse_args(
        ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--placeholder_token=<t>", "--initializer_token=x"]))
    expected = dict(train_batch_size=16, max_train_steps=5000, learning_rate=1e-4, lr_warmup_steps=500, repeats=100,
                    resolution=512, save_steps=500, checkpointing_steps=500, report_to="tensorboard",
                    learnable_property="object", output_dir="text-inversion-model", num_vectors=1,
                    num_train_epochs=100, gradient_accumulation_steps=1, lr_scheduler="constant", lr_num_cycles=1,
                    adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, logging_dir="logs",
                    num_validation_images=4, validation_steps=100, local_rank=-1, seed=None, scale_lr=False)
    assert {k: defaults[k] for k in expected} == expected


@pytest.fixture(scope="module")
def trained(tiny_pipeline, train_images, tmp_path_factory):
    """One short 2-vector run with a full-pipeline save, shared by the output checks below."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, num_vectors=2, save_as_full_pipeline=True,
                                      save_steps=3, gradient_accumulation_steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_run_writes_the_four_files(trained):
    for name in ("learned_embeds.bin", "learned_embeds.safetensors", "token_identifier.txt", "type_of_concept.txt"):
        assert os.path.isfile(os.path.join(trained, name)), name
    assert open(os.path.join(trained, "token_identifier.txt")).read() == "<cat-toy>"
    assert open(os.path.join(trained, "type_of_concept.txt")).read() == "object"
    vectors = read_vectors(os.path.join(trained, "learned_embeds.safetensors"))
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    binary = torch.load(os.path.join(trained, "learned_embeds.bin"), weights_only=True)
    assert list(binary) == ["<cat-toy>"] and binary["<cat-toy>"].dtype == torch.float32
    np.testing.assert_array_equal(binary["<cat-toy>"].numpy(), vectors)
    for step in (3, 6):
        assert os.path.isfile(os.path.join(trained, f"learned_embeds-steps-{step}.safetensors"))
        assert os.path.isfile(os.path.join(trained, f"learned_embeds-steps-{step}.bin"))
    np.testing.assert_array_equal(read_vectors(os.path.join(trained, "learned_embeds-steps-6.safetensors")), vectors)


@pytest.mark.parametrize("source", ["folder", "file"])
def test_diffusers_load_textual_inversion_gives_the_trained_rows(trained, tiny_pipeline, source):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    original = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    target = trained if source == "folder" else os.path.join(trained, "learned_embeds.safetensors")
    pipe.load_textual_inversion(target)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    np.testing.assert_array_equal(weight[ids].numpy(), read_vectors(os.path.join(trained, "learned_embeds.safetensors")))
    assert torch.equal(weight[: original.shape[0]], original)
    # The prompt expands the token to every vector, as during training.
    prompt_ids = pipe.maybe_convert_prompt("a photo of <cat-toy>", pipe.tokenizer)
    assert "<cat-toy>_1" in prompt_ids


def test_only_the_new_vectors_changed(trained, tiny_pipeline):
    """Every other embedding row and every UNet/VAE/text-encoder weight is bit-identical; each vector moved."""
    def tensors(folder, sub):
        files = [f for f in os.listdir(os.path.join(folder, sub)) if f.endswith(".safetensors")]
        assert len(files) == 1
        return load_file(os.path.join(folder, sub, files[0]))

    for sub in ("unet", "vae"):
        before, after = tensors(tiny_pipeline, sub), tensors(trained, sub)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), sub
    before, after = tensors(tiny_pipeline, "text_encoder"), tensors(trained, "text_encoder")
    assert all(k.startswith("text_model.") for k in after), "saved text encoder must keep the 4.x key layout"
    key = "text_model.embeddings.token_embedding.weight"
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    vocab = before[key].shape[0]
    assert after[key].shape[0] == vocab + 2
    assert torch.equal(after[key][:vocab], before[key])
    learned = torch.from_numpy(read_vectors(os.path.join(trained, "learned_embeds.safetensors")))
    assert torch.equal(after[key][vocab:], learned)
    from transformers import CLIPTokenizer

    init = before[key][CLIPTokenizer.from_pretrained(os.path.join(tiny_pipeline, "tokenizer")).encode(
        "toy", add_special_tokens=False)[0]]
    for row in learned:
        assert not torch.allclose(row, init), "every vector must be trained"
    saved_tokenizer = CLIPTokenizer.from_pretrained(os.path.join(trained, "tokenizer"))
    assert saved_tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"]) == [vocab, vocab + 1]


def test_checkpoint_rotation_keeps_the_newest(tiny_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, max_train_steps=8, checkpointing_steps=2,
                                      checkpoints_total_limit=2, train_batch_size=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-6", "checkpoint-8"]
    state = json.load(open(os.path.join(out, "checkpoint-8", "training_state.json")))
    assert state["step"] == 8 and state["seed"] == 1234


RESUME_SETTINGS = dict(max_train_steps=8, gradient_accumulation_steps=2, train_batch_size=1, lr_scheduler="linear",
                       lr_warmup_steps=2, num_vectors=2)


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline, train_images, tmp_path_factory):
    """The run both resume tests below must reach, with a checkpoint after step 4 (trained once for both)."""
    full = str(tmp_path_factory.mktemp("uninterrupted") / "full")
    result = run_in_process(base_args(tiny_pipeline, train_images, full, checkpointing_steps=4, **RESUME_SETTINGS))
    assert result.returncode == 0, result.stderr[-3000:]
    return full


@pytest.mark.parametrize("resume_as", ["checkpoint-4", "latest"])
def test_resume_reaches_the_uninterrupted_vectors(uninterrupted, tiny_pipeline, train_images, tmp_path, resume_as):
    full = uninterrupted
    # What an interruption after step 4 leaves behind: checkpoint-4 only, no final files.
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(full, "checkpoint-4"), os.path.join(part, "checkpoint-4"))
    second = run_in_process(base_args(tiny_pipeline, train_images, part, resume_from_checkpoint=resume_as, seed=None,
                                      **RESUME_SETTINGS))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 4" in second.stderr
    a = read_vectors(os.path.join(full, "learned_embeds.safetensors"))
    b = read_vectors(os.path.join(part, "learned_embeds.safetensors"))
    np.testing.assert_array_equal(a, b)


def test_accelerate_launch_with_default_config(tiny_pipeline, train_images, tmp_path):
    config = str(tmp_path / "accelerate.yaml")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    made = subprocess.run([accelerate, "config", "default", "--config_file", config], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    out = str(tmp_path / "out")
    result = run_script(base_args(tiny_pipeline, train_images, out, max_train_steps=2),
                        launcher=[accelerate, "launch", "--config_file", config])
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_vectors(os.path.join(out, "learned_embeds.safetensors")).shape == (1, 32)


def test_v_prediction_and_style_and_bf16_train(tiny_pipeline, train_images, tmp_path):
    model = str(tmp_path / "vpred")
    shutil.copytree(tiny_pipeline, model)
    config_path = os.path.join(model, "scheduler", "scheduler_config.json")
    config = json.load(open(config_path))
    config["prediction_type"] = "v_prediction"
    json.dump(config, open(config_path, "w"))
    out = str(tmp_path / "out")
    result = run_in_process(base_args(model, train_images, out, max_train_steps=3, learnable_property="style",
                                      mixed_precision="bf16", gradient_checkpointing=True, scale_lr=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert open(os.path.join(out, "type_of_concept.txt")).read() == "style"
    assert np.isfinite(read_vectors(os.path.join(out, "learned_embeds.safetensors"))).all()


def test_no_safe_serialization_writes_only_bin(tiny_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, max_train_steps=1, no_safe_serialization=True,
                                      export_formats="diffusers"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "learned_embeds.bin"))
    assert not any(f.endswith(".safetensors") for f in os.listdir(out))

