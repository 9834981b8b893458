"""The shapes-CLIP asset in transformers 4.57 (.venv-flax): every weight loads, zero-shot still reads the
shapes (tests/test_shapes_clip.py checks transformers 5)."""

import pytest

from shapes_clip_checks import assert_zero_shot_holds, load_asset_one_thread


@pytest.fixture(scope="module")
def loaded():
    yield from load_asset_one_thread()


def test_every_weight_loads_in_transformers_4(loaded):
    import transformers

    assert transformers.__version__.startswith("4."), transformers.__version__
    model, processor = loaded  # load_asset raises on any missing, unexpected or mismatched weight
    assert model.config.vision_config.image_size == 32
    ids = processor(text=["a photo of a purple star on grey"], return_tensors="np")["input_ids"][0].tolist()
    # The real CLIP BPE ids (the same as openai/clip-vit-large-patch14's tokenizer gives).
    assert ids == [49406, 320, 1125, 539, 320, 5496, 1565, 525, 5046, 49407]


def test_zero_shot_reads_colour_and_shape_of_fresh_images(loaded):
    assert_zero_shot_holds(*loaded)
