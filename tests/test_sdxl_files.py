"""SDXL embedding files: diffusers' pair (learned_embeds* for text_encoder, learned_embeds_2* for text_encoder_2) and
the one webui/ComfyUI file {"clip_l", "clip_g"}; reading either form before any model loads, the one-line refusals
of an SD-1.x file for SDXL (and the reverse) or of widths that fit neither encoder; the converter; the model card;
and diffusers loading what we write into the tiny SDXL pipeline. Widths are 32 and 48 as in the tiny SDXL pipeline,
so a clip_l/clip_g mix-up fails."""

import argparse
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers import REPO, one_line_error
from textual_inversion_core import convert, embeddings, hub, outputs
from webui_safe_loader import check_file

TOKEN = "<cat-toy>"
WIDTHS = (32, 48)  # tiny SDXL: text_encoder, text_encoder_2


def sdxl_vectors(num_vectors=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"clip_l": rng.standard_normal((num_vectors, WIDTHS[0])).astype(np.float32),
            "clip_g": rng.standard_normal((num_vectors, WIDTHS[1])).astype(np.float32)}


def assert_same_sdxl(got, expected):
    assert sorted(got) == ["clip_g", "clip_l"]
    for name in ("clip_l", "clip_g"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def run_args(output_dir, model, export_formats=("a1111", "kohya"), no_safe_serialization=False):
    """The arguments outputs.finish_run reads, as cli.parse_args gives them."""
    return argparse.Namespace(pretrained_model_name_or_path=model, output_dir=str(output_dir), placeholder_token=TOKEN,
                              learnable_property="object", export_formats=list(export_formats),
                              no_safe_serialization=no_safe_serialization, save_as_full_pipeline=False,
                              push_to_hub=False, revision=None, variant=None, num_vectors=2)


# --------------------------------------------------------------------------------------------------
# Writing


def test_diffusers_pair_holds_each_encoders_set_in_the_layout_diffusers_and_the_webui_read(tmp_path):
    vectors = sdxl_vectors()
    written = embeddings.write_diffusers(str(tmp_path), TOKEN, vectors, suffix="-steps-4")
    assert sorted(os.path.basename(p) for p in written) == [
        "learned_embeds-steps-4.bin", "learned_embeds-steps-4.safetensors",
        "learned_embeds_2-steps-4.bin", "learned_embeds_2-steps-4.safetensors"]
    for stem, part in (("learned_embeds", "clip_l"), ("learned_embeds_2", "clip_g")):
        stored = load_file(str(tmp_path / f"{stem}-steps-4.safetensors"))
        assert list(stored) == [TOKEN]
        np.testing.assert_array_equal(stored[TOKEN], vectors[part])
        pickled = str(tmp_path / f"{stem}-steps-4.bin")
        assert check_file(pickled)["layout"] == "legacy"  # the webui's safe loader accepts it
        twin = torch.load(pickled, weights_only=True)
        assert list(twin) == [TOKEN]
        np.testing.assert_array_equal(twin[TOKEN].numpy(), vectors[part])


def test_no_safe_serialization_writes_only_the_bin_pair(tmp_path):
    written = embeddings.write_diffusers(str(tmp_path), TOKEN, sdxl_vectors(), safe_serialization=False)
    assert sorted(os.path.basename(p) for p in written) == ["learned_embeds.bin", "learned_embeds_2.bin"]
    assert sorted(os.listdir(tmp_path)) == ["learned_embeds.bin", "learned_embeds_2.bin"]


@pytest.mark.parametrize("export_formats, webui_file", [(("a1111", "kohya"), True), (("a1111",), True),
                                                         (("kohya",), True), ((), False)])
def test_end_of_run_files(tiny_sdxl_pipeline, tmp_path, export_formats, webui_file):
    """The diffusers pair, the token files and, for a1111 and/or kohya, one {clip_l, clip_g} file (never an SDXL .pt)."""
    vectors = sdxl_vectors(seed=1)
    args = run_args(tmp_path, tiny_sdxl_pipeline, export_formats)
    written = outputs.finish_run(args, vectors, 12, [(1, 0.5), (2, 0.25)], None, lambda: None,
                                 logging.getLogger("test"))
    expected = ["learned_embeds.bin", "learned_embeds.safetensors", "learned_embeds_2.bin",
                "learned_embeds_2.safetensors", "token_identifier.txt", "type_of_concept.txt"]
    expected += ["cat-toy.safetensors"] * webui_file + ["loss.png"]
    assert [os.path.basename(p) for p in written] == expected
    assert sorted(os.listdir(tmp_path)) == sorted(expected)
    assert open(tmp_path / "token_identifier.txt").read() == TOKEN
    if webui_file:
        path = str(tmp_path / "cat-toy.safetensors")
        assert_same_sdxl(load_file(path), vectors)
        with safe_open(path, framework="np") as f:
            meta = f.metadata()
        assert "SDXL" in meta["description"] and "clip_g" in meta["description"]
        assert (meta["token"], meta["steps"], meta["num_vectors"], meta["dim_clip_l"], meta["dim_clip_g"]) == \
            (TOKEN, "12", "2", "32", "48")
        assert meta["base_model"] == "tiny-sdxl" and len(meta["base_model_hash"]) == 10


# --------------------------------------------------------------------------------------------------
# Reading, before any model


@pytest.mark.parametrize("safe", [True, False])
def test_either_file_of_the_pair_reads_both_parts(tmp_path, safe):
    vectors = sdxl_vectors(seed=2)
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors, safe_serialization=safe)
    ext = "safetensors" if safe else "bin"
    for name in (f"learned_embeds.{ext}", f"learned_embeds_2.{ext}"):
        found = embeddings.load_model_embedding(str(tmp_path / name), "sdxl", WIDTHS)
        assert found.kind == "diffusers-sdxl" and found.token == TOKEN
        assert_same_sdxl(found.vectors, vectors)


def test_step_copies_pair_by_their_suffix(tmp_path):
    early, late = sdxl_vectors(seed=3), sdxl_vectors(seed=4)
    embeddings.write_diffusers(str(tmp_path), TOKEN, early, suffix="-steps-2")
    embeddings.write_diffusers(str(tmp_path), TOKEN, late, suffix="-steps-4")
    assert_same_sdxl(embeddings.load_sdxl_embedding(str(tmp_path / "learned_embeds-steps-2.safetensors")).vectors, early)
    assert_same_sdxl(embeddings.load_sdxl_embedding(str(tmp_path / "learned_embeds_2-steps-4.bin")).vectors, late)


def test_webui_file_reads_back_with_its_metadata(tmp_path):
    vectors = sdxl_vectors(seed=5)
    path = embeddings.write_sdxl(str(tmp_path / "thing.safetensors"), TOKEN, vectors, 30, "org/sdxl-base", "abcdef0123")
    found = embeddings.load_model_embedding(path, "sdxl", WIDTHS)
    assert (found.kind, found.token, found.step, found.base_model, found.base_model_hash) == \
        ("clip", TOKEN, 30, "org/sdxl-base", "abcdef0123")
    assert_same_sdxl(found.vectors, vectors)
    # A file made elsewhere: the two tensors alone, 1-D parts of one vector, fp16.
    foreign = {"clip_g": vectors["clip_g"][0].astype(np.float16), "clip_l": vectors["clip_l"][0].astype(np.float16)}
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    found = embeddings.load_sdxl_embedding(str(tmp_path / "foreign.safetensors"), WIDTHS)
    assert found.token is None and found.vectors["clip_g"].shape == (1, 48)
    assert found.vectors["clip_l"].dtype == np.float32


def test_sd_file_for_sdxl_says_what_it_is(tmp_path):
    alone = str(tmp_path / "learned_embeds.safetensors")
    embeddings.write_diffusers(str(tmp_path), TOKEN, sdxl_vectors()["clip_l"])
    line = one_line_error(embeddings.load_model_embedding, alone, "sdxl", WIDTHS)
    assert "is an SD-1.x/2.x embedding (one vector set [2, 32], no learned_embeds_2 file beside it)" in line, line
    assert "{clip_l, clip_g}" in line and "learned_embeds_2.safetensors beside it" in line, line
    a1111 = embeddings.write_a1111(str(tmp_path / "thing.pt"), TOKEN, sdxl_vectors()["clip_g"], 1, "base")
    line = one_line_error(embeddings.load_model_embedding, a1111, "sdxl", None)
    assert "thing.pt' is an SD-1.x/2.x embedding (one vector set [2, 48])" in line, line


def test_width_that_fits_neither_encoder(tmp_path):
    path = str(tmp_path / "sd2.safetensors")
    save_file({TOKEN: np.zeros((2, 1024), np.float32)}, path)
    line = one_line_error(embeddings.load_model_embedding, path, "sdxl", WIDTHS)
    assert "width 1024 fits neither of this SDXL model's text encoders (32 and 48 wide)" in line, line
    wrong = embeddings.write_sdxl(str(tmp_path / "big.safetensors"), TOKEN,
                                  {"clip_l": np.zeros((1, 768), np.float32), "clip_g": np.zeros((1, 1280), np.float32)},
                                  1, "base")
    line = one_line_error(embeddings.load_model_embedding, wrong, "sdxl", WIDTHS)
    assert "widths clip_l 768, clip_g 1280" in line and "32 (text_encoder) and 48 (text_encoder_2)" in line, line


def test_swapped_parts_are_refused(tmp_path):
    vectors = sdxl_vectors()
    swapped = {"clip_l": vectors["clip_g"], "clip_g": vectors["clip_l"]}
    path = embeddings.write_sdxl(str(tmp_path / "swapped.safetensors"), TOKEN, swapped, 1, "base")
    assert "clip_l and clip_g swapped?" in one_line_error(embeddings.load_sdxl_embedding, path, WIDTHS)
    embeddings.write_diffusers(str(tmp_path), TOKEN, swapped)
    assert "swapped" in one_line_error(embeddings.load_sdxl_embedding, str(tmp_path / "learned_embeds.bin"), WIDTHS)


def test_sdxl_file_for_sd_model_says_what_it_is(tmp_path):
    vectors = sdxl_vectors()
    webui = embeddings.write_sdxl(str(tmp_path / "thing.safetensors"), TOKEN, vectors, 1, "base")
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors)
    for path in (webui, str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "learned_embeds_2.bin")):
        line = one_line_error(embeddings.load_model_embedding, path, "sd", 32)
        assert "is an SDXL embedding (clip_l [2, 32] + clip_g [2, 48]); this model is SD-1.x/2.x" in line, line
        assert "--dim 32" in line, line


def test_sd_file_for_sd_model_is_unchanged(tmp_path):
    vectors = sdxl_vectors()["clip_l"]
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors)
    found = embeddings.load_model_embedding(str(tmp_path / "learned_embeds.safetensors"), "sd", (32,))
    assert found.kind == "diffusers" and found.token == TOKEN
    np.testing.assert_array_equal(found.vectors, vectors)
    assert "does not match the text encoder's 48" in one_line_error(
        embeddings.load_model_embedding, str(tmp_path / "learned_embeds.safetensors"), "sd", 48)


def test_damaged_sdxl_files(tmp_path):
    half = str(tmp_path / "half.safetensors")
    save_file({"clip_l": np.zeros((2, 32), np.float32)}, half)
    assert "has clip_l but no clip_g" in one_line_error(embeddings.load_sdxl_embedding, half)
    uneven = str(tmp_path / "uneven.safetensors")
    save_file({"clip_l": np.zeros((2, 32), np.float32), "clip_g": np.zeros((3, 48), np.float32)}, uneven)
    assert "differ in their number of vectors" in one_line_error(embeddings.load_sdxl_embedding, uneven)
    embeddings.write_diffusers(str(tmp_path), TOKEN, np.zeros((2, 32), np.float32))
    save_file({TOKEN: np.zeros((3, 48), np.float32)}, str(tmp_path / "learned_embeds_2.safetensors"))
    line = one_line_error(embeddings.load_sdxl_embedding, str(tmp_path / "learned_embeds.safetensors"))
    assert "has 2 vectors but" in line and "learned_embeds_2.safetensors' 3" in line, line
    assert "does not exist" in one_line_error(embeddings.load_sdxl_embedding, str(tmp_path / "nope.safetensors"))


def test_text_encoder_widths_from_configs(tiny_sdxl_pipeline, tiny_pipeline, tmp_path):
    assert embeddings.text_encoder_widths(tiny_sdxl_pipeline, "sdxl") == WIDTHS
    assert embeddings.text_encoder_widths(tiny_pipeline, "sd") == (32,)
    assert embeddings.text_encoder_widths(str(tmp_path), "sd") is None  # no config: checked after loading


# --------------------------------------------------------------------------------------------------
# The converter


def test_converter_round_trips_both_sdxl_forms(tmp_path):
    vectors = sdxl_vectors(seed=6)
    source = embeddings.write_sdxl(str(tmp_path / "source.safetensors"), TOKEN, vectors, 9, "org/base", "0123456789")
    os.makedirs(tmp_path / "pair")
    token, written = convert.convert(source, str(tmp_path / "pair" / "learned_embeds.safetensors"))
    assert token == TOKEN and [os.path.basename(p) for p in written] == ["learned_embeds.safetensors",
                                                                        "learned_embeds_2.safetensors"]
    _, written = convert.convert(str(tmp_path / "pair" / "learned_embeds_2.safetensors"), str(tmp_path / "back.safetensors"))
    assert_same_sdxl(load_file(written[0]), vectors)
    _, written = convert.convert(source, str(tmp_path / "folder") + "/")
    assert sorted(os.listdir(tmp_path / "folder")) == [
        "cat-toy.safetensors", "learned_embeds.bin", "learned_embeds.safetensors", "learned_embeds_2.bin",
        "learned_embeds_2.safetensors", "token_identifier.txt", "type_of_concept.txt"]
    found = embeddings.load_sdxl_embedding(str(tmp_path / "folder" / "cat-toy.safetensors"))
    assert (found.step, found.base_model, found.base_model_hash) == (9, "org/base", "0123456789")
    assert_same_sdxl(embeddings.load_sdxl_embedding(str(tmp_path / "folder" / "learned_embeds.bin")).vectors, vectors)


def test_converter_takes_one_part_with_dim(tmp_path):
    vectors = sdxl_vectors(seed=7)
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors)
    _, written = convert.convert(str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "g.pt"), dim=48)
    found = embeddings.load_embedding(written[0])
    assert found.kind == "a1111"
    np.testing.assert_array_equal(found.vectors, vectors["clip_g"])
    line = one_line_error(convert.convert, str(tmp_path / "learned_embeds.bin"), str(tmp_path / "x.pt"), dim=768)
    assert "no part of width 768 (clip_l=32, clip_g=48)" in line, line


def test_converter_refuses_sdxl_forms_that_do_not_exist(tmp_path):
    source = embeddings.write_sdxl(str(tmp_path / "source.safetensors"), TOKEN, sdxl_vectors(), 1, "base")
    assert "two" in one_line_error(convert.convert, source, str(tmp_path / "raw.pt"), fmt="raw")
    assert "name OUT learned_embeds.safetensors" in one_line_error(
        convert.convert, source, str(tmp_path / "mine.safetensors"), fmt="diffusers")
    assert not [n for n in os.listdir(tmp_path) if n != "source.safetensors"]


def webui_reads_pickled_embedding(path):
    """What the webui's create_embedding_from_data (v1.10) makes of a .pt it has unpickled, restated: an A1111 file
    (string_to_param), an SDXL dict (clip_g and clip_l: every value taken as a tensor and cast to fp32), or a one-entry
    diffusers dict. Returns (vectors, number of vectors, summed width) as the webui computes them."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        (emb,) = data["string_to_param"].values()
        return emb.float(), emb.shape[0], emb.shape[-1]
    if isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items()}  # fails on any non-tensor value
        return vec, data["clip_g"].shape[0], data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    (emb,) = data.values()
    return emb.float(), emb.shape[0], emb.shape[-1]


def test_converter_writes_the_webuis_sdxl_pt(tmp_path):
    """The webui loads a pickled {clip_l, clip_g} .pt: the converter writes it (name.pt or --format a1111), in the
    layout the webui's safe loader accepts, with nothing but the two tensors; our readers read it back exactly."""
    vectors = sdxl_vectors(seed=12)
    source = embeddings.write_sdxl(str(tmp_path / "source.safetensors"), TOKEN, vectors, 1, "base")
    for out, fmt in ((str(tmp_path / "cat-toy.pt"), None), (str(tmp_path / "other.bin"), "a1111")):
        _, written = convert.convert(source, out, fmt=fmt)
        assert written == [out]
        seen = check_file(out)
        assert seen["layout"] == "legacy" and seen["storages"] == 2, seen
        data = torch.load(out, map_location="cpu", weights_only=True)
        assert sorted(data) == ["clip_g", "clip_l"] and all(v.dtype == torch.float32 for v in data.values())
        webui_vectors, count, width = webui_reads_pickled_embedding(out)
        assert (count, width) == (2, sum(WIDTHS))
        assert_same_sdxl({k: v.numpy() for k, v in webui_vectors.items()}, vectors)
        assert embeddings.is_sdxl_embedding(out)
        assert_same_sdxl(embeddings.load_sdxl_embedding(out, widths=WIDTHS).vectors, vectors)
    _, written = convert.convert(str(tmp_path / "cat-toy.pt"), str(tmp_path / "back.safetensors"))
    assert_same_sdxl(load_file(written[0]), vectors)


def test_converter_command_line_sdxl(tmp_path):
    vectors = sdxl_vectors(seed=8)
    source = embeddings.write_sdxl(str(tmp_path / "in.safetensors"), TOKEN, vectors, 1, "base")
    result = subprocess.run([sys.executable, "-m", "textual_inversion_core.convert", source,
                             str(tmp_path / "learned_embeds.bin")], cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "learned_embeds.bin" in result.stdout and "learned_embeds_2.bin" in result.stdout
    assert_same_sdxl(embeddings.load_sdxl_embedding(str(tmp_path / "learned_embeds_2.bin")).vectors, vectors)


# --------------------------------------------------------------------------------------------------
# The model card, the upload and diffusers


def test_model_card_shows_the_two_load_calls(tiny_sdxl_pipeline, tmp_path):
    card = hub.model_card("me/cat-toy", "stabilityai/stable-diffusion-xl-base-1.0", TOKEN, "object", 2, sdxl=True,
                          export_formats=("a1111",))
    assert "StableDiffusionXLPipeline" in card and "SDXL" in card and "stable-diffusion-xl" in card
    assert 'weight_name="learned_embeds.safetensors"' in card
    assert "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)" in card
    assert 'weight_name="learned_embeds_2.safetensors"' in card
    assert "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)" in card
    assert "`cat-toy.safetensors`" in card and "cat-toy.pt" not in card
    bin_card = hub.model_card("me/cat-toy", "local-sdxl", TOKEN, "object", 2, sdxl=True, safe_serialization=False,
                              base_model_on_hub=False)
    assert 'weight_name="learned_embeds_2.bin"' in bin_card and "base_model:" not in bin_card
    assert "python -m textual_inversion_core.convert learned_embeds.bin cat-toy.safetensors" in bin_card


def test_model_card_code_loads_the_run_into_diffusers(tiny_sdxl_pipeline, tmp_path):
    """The card's diffusers code, run on a local copy of the repo: each encoder gets its own set."""
    vectors = sdxl_vectors(seed=9)
    out = tmp_path / "repo"
    outputs.write_final_outputs(run_args(out, tiny_sdxl_pipeline), vectors, 5, [])
    card = hub.model_card(str(out), "tiny-sdxl", TOKEN, "object", 2, sdxl=True, base_model_on_hub=False)
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace('"path/to/tiny-sdxl"', repr(tiny_sdxl_pipeline))
    code = "\n".join(line for line in code.splitlines() if not line.startswith("image = "))
    scope = {}
    exec(code, scope)
    pipe = scope["pipe"]
    for tokenizer, text_encoder, part in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                          (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        rows = text_encoder.get_input_embeddings().weight[ids].detach().numpy()
        np.testing.assert_array_equal(rows, vectors[part], err_msg=part)


def test_upload_leaves_out_both_step_copies(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    embeddings.write_all(str(tmp_path), TOKEN, sdxl_vectors(), 4, "base", "object", export_formats=("a1111",))
    embeddings.write_diffusers(str(tmp_path), TOKEN, sdxl_vectors(), suffix="-steps-2")
    uploaded = sorted(filter_repo_objects(sorted(os.listdir(tmp_path)), ignore_patterns=hub.UPLOAD_IGNORE))
    assert uploaded == ["cat-toy.safetensors", "learned_embeds.bin", "learned_embeds.safetensors", "learned_embeds_2.bin",
                        "learned_embeds_2.safetensors", "token_identifier.txt", "type_of_concept.txt"]


def test_tiny_sdxl_pipeline_is_an_sdxl_pipeline_with_two_widths(tiny_sdxl_pipeline):
    """tools/make_tiny_pipeline.py --size tiny-sdxl: diffusers' SDXL pipeline loads it and draws 64 px; the encoders'
    widths differ, and the UNet takes both side by side plus text_encoder_2's pooled projection and 6 time ids."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    assert widths == WIDTHS and type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    unet = pipe.unet.config
    assert unet.cross_attention_dim == sum(WIDTHS) and unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + \
        pipe.text_encoder_2.config.projection_dim
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    image = pipe("a photo of a toy", num_inference_steps=1, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
