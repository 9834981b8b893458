"""The shapes-CLIP asset (tests/assets/shapes-clip, trained by tools/train_shapes_clip.py): the offline CLIP that
scores textual-inversion steps (reconstruction, editability) on the shapes model. It must load with every weight
in transformers 5 (tests/flax/test_flax_shapes_clip.py checks transformers 4.57), preprocess images as it was
trained, and tell colours and shapes apart zero-shot, held-out pairs included."""

import os
import shutil

import numpy as np
import pytest

from shapes_clip_checks import ASSET, assert_zero_shot_holds, load_asset, load_asset_one_thread, training_record


@pytest.fixture(scope="module")
def loaded():
    yield from load_asset_one_thread()


def test_every_saved_weight_loads_and_every_model_weight_is_saved(loaded):
    from safetensors import safe_open

    model, _ = loaded
    with safe_open(os.path.join(ASSET, "model.safetensors"), "np") as f:
        saved = set(f.keys())
    # position_ids are buffers transformers rebuilds; every parameter must come from the file.
    assert {name for name, _ in model.named_parameters()} <= saved
    size = sum(os.path.getsize(os.path.join(ASSET, name)) for name in os.listdir(ASSET))
    assert size <= 10 * 2**20, f"the asset grew to {size / 2**20:.1f} MB"


def test_the_loader_refuses_a_folder_with_a_weight_missing(tmp_path):
    """load_asset's check can fail: drop one tensor from a copy and it must say which."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "clip"
    shutil.copytree(ASSET, folder)
    state = load_file(str(folder / "model.safetensors"))
    dropped = "visual_projection.weight"
    del state[dropped]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=dropped):
        load_asset(str(folder))


def test_the_image_processor_preprocesses_as_training_did(loaded):
    from tools import shapes, train_shapes_clip

    _, processor = loaded
    rng = np.random.default_rng(5)
    images = np.stack([shapes.render("red", "star", rng, 32), shapes.render("blue", "cross", rng, 32)])
    by_processor = processor(images=list(images), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(by_processor, train_shapes_clip.pixel_values(images), atol=1e-5)


def test_zero_shot_reads_colour_and_shape_of_fresh_images(loaded):
    assert_zero_shot_holds(*loaded)


def test_training_record_says_what_was_held_out_and_measured():
    record = training_record()
    assert record["held_out"] == ["purple star", "green triangle"]
    for key in ("command", "seed", "train_seconds", "cpu", "zero_shot_seen_pairs", "zero_shot_purple_star",
                "zero_shot_green_triangle", "image_nearest_centroid"):
        assert key in record, key
