"""Captions in the Flax trainer (the dataset is the shared core's, tests/test_captions.py checks its rules):
a folder with sidecar captions and one image without a caption file trains, with the documented warning;
2 devices equal 1 device with the same global batch; and the captions reach the prompts."""

import os

import numpy as np
import pytest

from helpers import flax_base_args, read_vectors, run_flax, run_flax_in_process, write_images

STEPS = 3


@pytest.fixture(scope="module")
def captioned_data(tmp_path_factory):
    folder = write_images(tmp_path_factory.mktemp("flax-captions") / "data", count=4)
    captions = {"image_0": "a toy on green grass", "image_1": "<cat-toy> asleep on a red sofa",
                "image_2": "a toy in the snow, seen from above"}  # image_3.png has none
    for stem, text in captions.items():
        with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return folder


def test_captioned_folder_trains_and_two_devices_equal_one(tiny_pipeline, captioned_data, compile_cache, tmp_path):
    outs = {name: str(tmp_path / name) for name in ("one_device", "two_devices", "builtin_templates")}
    captioned = dict(max_train_steps=STEPS, caption_extension=".txt")
    results = [
        run_flax_in_process(flax_base_args(tiny_pipeline, captioned_data, outs["one_device"], train_batch_size=2,
                                           **captioned), cache=compile_cache),
        run_flax(flax_base_args(tiny_pipeline, captioned_data, outs["two_devices"], train_batch_size=1, **captioned),
                 devices=2, cache=compile_cache),
    ]
    assert "devices = 2" in results[1].stderr
    for result in results:  # the missing caption: one warning naming the image, and the run goes on
        warned = [line for line in result.stderr.splitlines() if "have no .txt caption file" in line]
        assert len(warned) == 1 and "image_3.png" in warned[0] and "template alone" in warned[0], result.stderr[-3000:]
    one, two = (read_vectors(os.path.join(outs[n], "learned_embeds.safetensors")) for n in ("one_device", "two_devices"))
    assert one.shape == (2, 32)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)

    # The same run without captions trains other vectors: the captioned prompts were the ones trained on.
    run_flax_in_process(flax_base_args(tiny_pipeline, captioned_data, outs["builtin_templates"], train_batch_size=2,
                                       max_train_steps=STEPS), cache=compile_cache)
    builtin = read_vectors(os.path.join(outs["builtin_templates"], "learned_embeds.safetensors"))
    assert float(np.abs(builtin - one).max()) > 1e-6
