"""Mistakes a user can make end in one clear UserError in the Flax trainer too (in-process runs)."""

import os

import pytest

import textual_inversion_flax as ti_flax
from helpers import flax_base_args
from textual_inversion_core.errors import UserError


def test_placeholder_already_in_vocabulary(tiny_pipeline, train_images, tmp_path):
    with pytest.raises(UserError, match="already in the tokenizer's vocabulary"):
        ti_flax.main(flax_base_args(tiny_pipeline, train_images, str(tmp_path / "out"), placeholder_token="toy"))


def test_initializer_word_of_several_tokens(tiny_pipeline, train_images, tmp_path):
    with pytest.raises(UserError, match="is 6 tokens .* must be a single token"):
        ti_flax.main(flax_base_args(tiny_pipeline, train_images, str(tmp_path / "out"),
                                    initializer_token="toyotacorollahatchback"))


def test_init_from_with_the_wrong_width(tiny_pipeline, train_images, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    path = str(tmp_path / "wide.safetensors")
    save_file({"<x>": np.zeros((2, 768), np.float32)}, path)
    with pytest.raises(UserError, match="--init_from: .*width 768 does not match the text encoder.s 32"):
        ti_flax.main(flax_base_args(tiny_pipeline, train_images, str(tmp_path / "out"), init_from=path))


def test_diverging_run_stops_with_a_clear_error_and_writes_nothing(tiny_pipeline, train_images, compile_cache,
                                                                   tmp_path):
    import jax

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=r"(loss|learned vectors) became .*lower --learning_rate"):
        ti_flax.main(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=2, max_train_steps=3,
                                    learning_rate=1e30, save_steps=1, checkpointing_steps=1))
    written = sorted(os.listdir(out))
    # Step 1 is still finite (and saved); the step that diverged saved nothing and no final file exists.
    assert "learned_embeds.safetensors" not in written
    assert all(not n.startswith("checkpoint-") or n == "checkpoint-1" for n in written), written


def test_corrupt_weight_file_is_named(tiny_pipeline, train_images, tmp_path):
    import shutil

    folder = str(tmp_path / "corrupt")
    shutil.copytree(tiny_pipeline, folder)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match=r"cannot load unet from .*corrupt"):
        ti_flax.main(flax_base_args(folder, train_images, str(tmp_path / "out")))
