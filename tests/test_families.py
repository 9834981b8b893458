"""textual_inversion_core.families: the family of a pipeline from its model_index.json, without loading a model."""

import json
import os

import pytest

from textual_inversion_core import families, preflight

# model_index.json of the public pipelines (the components' class names as their repos list them).
INDEXES = {
    "sd": {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
           "unet": ["diffusers", "UNet2DConditionModel"]},
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "unet": ["diffusers", "UNet2DConditionModel"]},
    "sd3": {"_class_name": "StableDiffusion3Pipeline", "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "transformer": ["diffusers", "SD3Transformer2DModel"]},
    "flux": {"_class_name": "FluxPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "transformer": ["diffusers", "FluxTransformer2DModel"]},
}


def write_index(folder, index):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_family_from_class_name_and_from_components(tmp_path, name):
    assert families.family_of(write_index(tmp_path / "named", INDEXES[name])).name == name
    # A pipeline class of another name (a community pipeline): the components decide.
    renamed = dict(INDEXES[name], _class_name="MyCustomPipeline")
    assert families.family_of(write_index(tmp_path / "renamed", renamed)).name == name
    assert preflight.model_family(str(tmp_path / "named")) == name


@pytest.mark.parametrize("class_name, name", [("StableDiffusionXLImg2ImgPipeline", "sdxl"),
                                              ("StableDiffusion3Img2ImgPipeline", "sd3"),
                                              ("FluxImg2ImgPipeline", "flux"), ("StableDiffusionImg2ImgPipeline", "sd")])
def test_other_pipelines_of_a_family(tmp_path, class_name, name):
    index = dict(INDEXES[name], _class_name=class_name)
    assert families.family_of(write_index(tmp_path, index)).name == name


def test_sdxl_refiner_without_text_encoder_is_sdxl(tmp_path):
    # The SDXL refiner lists text_encoder as [null, null]; the old rule (text_encoder_2 listed) said sdxl too.
    index = dict(INDEXES["sdxl"], _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    assert families.family_of(write_index(tmp_path, index)) is families.SDXL


def test_folder_without_model_index(tmp_path):
    os.makedirs(tmp_path / "sd" / "text_encoder")
    assert families.family_of(str(tmp_path / "sd")) is families.SD
    os.makedirs(tmp_path / "xl" / "text_encoder_2")
    assert families.family_of(str(tmp_path / "xl")) is families.SDXL


def test_hub_cache_and_unknown_ids(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "a" * 40
    repo = tmp_path / "models--org--flux-model"
    write_index(repo / "snapshots" / commit, INDEXES["flux"])
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert families.family_of("org/flux-model") is families.FLUX
    assert families.family_of("org/not-cached") is None  # decided once the model is loaded


def test_tiny_pipelines(tiny_pipeline, tiny_sdxl_pipeline):
    assert families.family_of(tiny_pipeline) is families.SD
    assert families.family_of(tiny_sdxl_pipeline) is families.SDXL


def test_encoders_and_trained_encoders():
    sd3, flux = families.get("sd3"), families.get("flux")
    assert [(e.subfolder, e.tokenizer, e.file_key, e.diffusers_stem, e.kind) for e in sd3.encoders] == [
        ("text_encoder", "tokenizer", "clip_l", "learned_embeds", "clip"),
        ("text_encoder_2", "tokenizer_2", "clip_g", "learned_embeds_2", "clip"),
        ("text_encoder_3", "tokenizer_3", "t5xxl", "learned_embeds_3", "t5")]
    assert [(e.subfolder, e.file_key, e.diffusers_stem, e.kind) for e in flux.encoders] == [
        ("text_encoder", "clip_l", "learned_embeds", "clip"), ("text_encoder_2", "t5xxl", "learned_embeds_2", "t5")]
    assert [e.file_key for e in families.trained_encoders("flux")] == ["clip_l"]
    assert [e.file_key for e in families.trained_encoders(flux, enable_t5_ti=True)] == ["clip_l", "t5xxl"]
    assert [e.file_key for e in families.trained_encoders("sd3", True)] == ["clip_l", "clip_g", "t5xxl"]
    assert [e.file_key for e in families.trained_encoders("sdxl", True)] == ["clip_l", "clip_g"]
    assert sd3.flow_matching and flux.flow_matching and not families.SDXL.flow_matching
    assert not sd3.flax and families.SD.flax
    with pytest.raises(ValueError):
        families.get("kandinsky")
