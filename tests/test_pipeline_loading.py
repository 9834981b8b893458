"""textual_inversion_core.pipeline_loading.load_embedding_into_pipeline: the files of each family go into the loaded
diffusers pipeline (SD, SDXL, Flux.1 through diffusers' loader, Flux's T5 part through text_encoder_2; SD3 by our
own code), each new token's id maps to exactly our vector in each encoder, the prompt reaches those ids, and a 32 px
generation with the token runs."""

import os

import numpy as np
import pytest
import torch

from textual_inversion_core import embeddings, families
from textual_inversion_core.errors import UserError
from textual_inversion_core.pipeline_loading import load_embedding_into_pipeline

TOKEN = "<cat-toy>"
NUM_VECTORS = 2


def load_pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def random_parts(pipe, spec, keys, seed=0):
    rng = np.random.default_rng(seed)
    width = {e.file_key: getattr(pipe, e.subfolder).get_input_embeddings().weight.shape[1] for e in spec.encoders}
    return {key: rng.standard_normal((NUM_VECTORS, width[key])).astype(np.float32) for key in keys}


def prompt_ids(pipe, tokenizer, text):
    if hasattr(pipe, "maybe_convert_prompt"):  # diffusers' own expansion of a multi-vector token
        text = pipe.maybe_convert_prompt(text, tokenizer)
    return tokenizer(text).input_ids


def check_loaded(pipe, spec, parts, trigger):
    token_names = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, NUM_VECTORS)]
    for encoder in spec.encoders:
        tokenizer, text_encoder = getattr(pipe, encoder.tokenizer), getattr(pipe, encoder.subfolder)
        if encoder.file_key not in parts:
            assert TOKEN not in tokenizer.get_vocab(), encoder.subfolder
            continue
        ids = tokenizer.convert_tokens_to_ids(token_names)
        table = text_encoder.get_input_embeddings().weight.detach()
        assert torch.equal(table[ids], torch.from_numpy(parts[encoder.file_key])), encoder.subfolder
        got = prompt_ids(pipe, tokenizer, f"a photo of {trigger}")
        assert [i for i in got if i in ids] == ids, (encoder.subfolder, got)


CASES = [  # family, fixture, trained parts, file given
    ("sd", "tiny_pipeline", ("clip_l",), "folder"),
    ("sdxl", "tiny_sdxl_pipeline", ("clip_l", "clip_g"), "folder"),
    ("flux", "tiny_flux_pipeline", ("clip_l", "t5xxl"), "folder"),
    ("flux", "tiny_flux_pipeline", ("clip_l",), "one-file"),
    ("sd3", "tiny_sd3_pipeline", ("clip_l", "clip_g", "t5xxl"), "one-file"),
    ("sd3", "tiny_sd3_pipeline", ("clip_l", "clip_g"), "learned_embeds_2.safetensors"),
]


@pytest.mark.parametrize("family, fixture, keys, given", CASES)
def test_each_family_loads_and_generates(request, tmp_path, family, fixture, keys, given):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    spec = families.get(family)
    assert families.family_from_index(dict(pipe.config)) is spec
    parts = random_parts(pipe, spec, keys)
    vectors = parts["clip_l"] if family == "sd" else parts
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 5, "base", "object", export_formats=("kohya",), family=family)
    path = {"folder": str(tmp_path), "one-file": str(tmp_path / "cat-toy.safetensors")}.get(given, str(tmp_path / given))
    trigger = load_embedding_into_pipeline(pipe, path)
    assert trigger == (f"{TOKEN} {TOKEN}_1" if family == "sd3" else TOKEN)
    check_loaded(pipe, spec, parts, trigger)
    extra = {"max_sequence_length": 32} if spec.flow_matching else {}
    image = pipe(f"a photo of {trigger}", height=32, width=32, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_the_t5_part_changes_flux_conditioning(tmp_path, tiny_flux_pipeline):
    """The T5 part is used: the T5 sequence of the prompt with the token is the one our vectors give."""
    pipe = load_pipeline(tiny_flux_pipeline)
    parts = random_parts(pipe, families.FLUX, ("clip_l", "t5xxl"), seed=1)
    embeddings.write_single_file(str(tmp_path / "e.safetensors"), TOKEN, parts, 1, "base", family="flux")
    trigger = load_embedding_into_pipeline(pipe, str(tmp_path / "e.safetensors"))
    before, _, _ = pipe.encode_prompt(f"a photo of {trigger}", prompt_2=None, max_sequence_length=32)
    with torch.no_grad():
        ids = pipe.tokenizer_2.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        pipe.text_encoder_2.get_input_embeddings().weight[ids] += 1.0
    after, _, _ = pipe.encode_prompt(f"a photo of {trigger}", prompt_2=None, max_sequence_length=32)
    assert not torch.allclose(before, after)


def test_wrong_family_and_taken_token(tmp_path, tiny_sd3_pipeline):
    pipe = load_pipeline(tiny_sd3_pipeline)
    rng = np.random.default_rng(0)
    flux = {"clip_l": rng.standard_normal((1, 32)).astype(np.float32), "t5xxl": rng.standard_normal((1, 64)).astype(np.float32)}
    embeddings.write_single_file(str(tmp_path / "flux.safetensors"), TOKEN, flux, 1, "base", family="flux")
    with pytest.raises(UserError, match="is a Flux.1 embedding.*this model is SD3"):
        load_embedding_into_pipeline(pipe, str(tmp_path / "flux.safetensors"))
    parts = random_parts(pipe, families.SD3, ("clip_l", "clip_g"))
    embeddings.write_single_file(str(tmp_path / "sd3.safetensors"), TOKEN, parts, 1, "base", family="sd3")
    load_embedding_into_pipeline(pipe, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(UserError, match="already has"):
        load_embedding_into_pipeline(pipe, str(tmp_path / "sd3.safetensors"))
    assert load_embedding_into_pipeline(pipe, str(tmp_path / "sd3.safetensors"), token="<other>") == "<other> <other>_1"
    assert os.path.exists(tmp_path / "sd3.safetensors")


@pytest.mark.parametrize("family, enable_t5_ti", [("flux", True), ("flux", False), ("sd3", True)])
def test_model_card_of_flow_families(family, enable_t5_ti):
    from textual_inversion_core import hub

    spec = families.get(family)
    card = hub.model_card("me/cat-toy", "org/base", TOKEN, "object", 2, export_formats=("kohya",), family=family,
                          trained=families.trained_encoders(spec, enable_t5_ti))
    assert "from textual_inversion_core.pipeline_loading import load_embedding_into_pipeline" in card
    assert f"{spec.pipeline_class}.from_pretrained(\"org/base\")" in card
    assert ("`t5xxl`, `t5`" in card) == enable_t5_ti and "`cat-toy.safetensors`" in card
    if family == "flux":  # diffusers' own loader works for Flux: the T5 file goes into text_encoder_2
        assert ('weight_name="learned_embeds_2.safetensors"' in card) == enable_t5_ti
        assert "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in card or not enable_t5_ti
    else:
        assert f'"{TOKEN} {TOKEN}_1"' in card and "learned_embeds_3.safetensors" in card
