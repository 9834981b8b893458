"""The tiny SD3 and Flux.1 pipelines (tools/tiny_flow_pipelines.py) load with diffusers' own pipeline classes and
generate; their T5 tokenizer (trained offline) and encoders have the real ones' layout."""

import json
import os

import numpy as np
import pytest
import torch

from textual_inversion_core import families
from tools.tiny_flow_pipelines import FLUX_WIDTHS, SD3_WIDTHS, T5_WORDS


def load(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def generate(pipe, **extra):
    return pipe("a photo of a toy", height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="np", **extra).images


def check_t5(tokenizer, text_encoder, width):
    assert type(tokenizer).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for word in T5_WORDS:  # the initializers tests and demos use are one token each, as in the real T5
        ids = tokenizer(word).input_ids
        assert len(ids) == 2 and ids[-1] == 1 and ids[0] != tokenizer.unk_token_id, (word, ids)
    rows = text_encoder.get_input_embeddings().weight.shape
    # More embedding rows than tokens, as t5-v1_1 (32128 rows, 32100 tokens).
    assert rows[1] == width and rows[0] > len(tokenizer) and rows[0] % 128 == 0


def test_tiny_sd3_loads_as_sd3_and_generates(tiny_sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    with open(os.path.join(tiny_sd3_pipeline, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusion3Pipeline"
    assert families.family_of(tiny_sd3_pipeline) is families.SD3
    pipe = load(tiny_sd3_pipeline)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__, type(pipe.text_encoder_3).__name__] \
        == ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert pipe.text_encoder.config.hidden_size == SD3_WIDTHS["clip_l"]
    assert pipe.text_encoder_2.config.hidden_size == SD3_WIDTHS["clip_g"]
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    check_t5(pipe.tokenizer_3, pipe.text_encoder_3, SD3_WIDTHS["t5xxl"])
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor and pipe.vae.config.scaling_factor
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_tiny_flux_loads_as_flux_and_generates(tiny_flux_pipeline):
    from diffusers import FluxPipeline

    assert families.family_of(tiny_flux_pipeline) is families.FLUX
    pipe = load(tiny_flux_pipeline)
    assert isinstance(pipe, FluxPipeline)
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__] == ["CLIPTextModel", "T5EncoderModel"]
    assert pipe.text_encoder.config.hidden_size == FLUX_WIDTHS["clip_l"]
    check_t5(pipe.tokenizer_2, pipe.text_encoder_2, FLUX_WIDTHS["t5xxl"])
    assert pipe.transformer.config.guidance_embeds  # FLUX.1-dev's guidance input is exercised
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    image = generate(pipe, guidance_scale=3.5)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("folder", ["text_encoder", "text_encoder_2"])
def test_flux_encoders_load_their_own_weights(tiny_flux_pipeline, folder):
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(os.path.join(tiny_flux_pipeline, folder))
    saved = load_file(os.path.join(tiny_flux_pipeline, folder, "model.safetensors"))
    embedding = model.get_input_embeddings().weight
    stored = [v for k, v in saved.items() if k.endswith(("token_embedding.weight", "shared.weight", "embed_tokens.weight"))]
    assert stored and torch.equal(embedding, stored[0])
