"""The Flax trainer stops on an SD3 or Flux.1 pipeline (diffusers has no Flax models for them) in one line naming
the family and textual_inversion.py, from model_index.json alone: before the images are read or any model loads."""

import json
import os

import pytest

import textual_inversion_flax as ti_flax
from flax_backend import weights
from helpers import flax_base_args
from textual_inversion_core.errors import UserError

# model_index.json as tools/make_tiny_pipeline.py writes it for tiny-sd3 / tiny-flux (no weights needed here).
INDEXES = {
    "SD3": {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
    "Flux.1": {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
               "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
}


@pytest.mark.parametrize("label", sorted(INDEXES))
def test_sd3_and_flux_are_refused_before_anything_loads(tmp_path, label):
    folder = tmp_path / "model"
    os.makedirs(folder)
    (folder / "model_index.json").write_text(json.dumps(INDEXES[label]))
    # No training images at all: the family is refused first.
    argv = flax_base_args(str(folder), str(tmp_path / "no-images"), str(tmp_path / "out"))
    with pytest.raises(UserError) as info:
        ti_flax.main(argv)
    line = str(info.value)
    assert "\n" not in line and label in line and INDEXES[label]["_class_name"] in line
    assert "textual_inversion.py" in line and "no Flax models" in line
    # A hub id resolved to a folder later is refused by the loader's family check too.
    with pytest.raises(UserError, match=label.replace(".", r"\.")):
        weights.model_family(str(folder))


def test_sd_and_sdxl_still_pass(tiny_pipeline, tiny_sdxl_pipeline, tmp_path):
    assert weights.model_family(tiny_pipeline) == "sd"
    assert weights.model_family(tiny_sdxl_pipeline) == "sdxl"
    os.makedirs(tmp_path / "parts" / "text_encoder_2")
    assert weights.model_family(str(tmp_path / "parts")) == "sdxl"
