"""SD3 and Flux.1 embedding files: one diffusers file per trained text encoder (learned_embeds, _2, _3 by the
encoder's place in the pipeline) and the one file with ComfyUI's keys (clip_l, clip_g, t5xxl) plus T5 under t5
(OneTrainer, diffusers' advanced scripts); reading them back before any model loads (--init_from, the converter),
and the one-line refusals of a file made for another family. Widths are the tiny pipelines' (SD3 32/48/96,
Flux 32/64), so a mix-up of encoders fails."""

import argparse
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers import one_line_error
from textual_inversion_core import convert, embeddings, families, preflight
from tools.tiny_flow_pipelines import FLUX_WIDTHS, SD3_WIDTHS

TOKEN = "<cat-toy>"
WIDTHS = {"sd3": SD3_WIDTHS, "flux": FLUX_WIDTHS}


def flow_vectors(family, keys=None, num_vectors=2, seed=0):
    rng = np.random.default_rng(seed)
    widths = WIDTHS[family]
    return {key: rng.standard_normal((num_vectors, widths[key])).astype(np.float32) for key in keys or widths}


def assert_same(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def metadata_of(path):
    with safe_open(path, framework="np") as f:
        return f.metadata()


@pytest.mark.parametrize("family, stems", [("flux", {"clip_l": "learned_embeds", "t5xxl": "learned_embeds_2"}),
                                           ("sd3", {"clip_l": "learned_embeds", "clip_g": "learned_embeds_2",
                                                    "t5xxl": "learned_embeds_3"})])
def test_end_of_run_files(tmp_path, family, stems):
    vectors = flow_vectors(family)
    written = embeddings.write_all(str(tmp_path), TOKEN, vectors, 40, "org/base", "object",
                                   export_formats=("a1111", "kohya"), family=family)
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors, suffix="-steps-20", family=family)
    names = sorted(os.path.basename(p) for p in written)
    expected = sorted([f"{stem}.{ext}" for stem in stems.values() for ext in ("bin", "safetensors")]
                      + ["cat-toy.safetensors", "token_identifier.txt", "type_of_concept.txt"])
    assert names == expected  # no A1111 .pt: the webui has none for these families
    for key, stem in stems.items():
        for suffix in ("", "-steps-20"):
            path = tmp_path / f"{stem}{suffix}.safetensors"
            assert list(load_file(path)) == [TOKEN]
            np.testing.assert_array_equal(load_file(path)[TOKEN], vectors[key])
            assert metadata_of(path) == {"format": "np", "family": family, "key": key,
                                         "text_encoder": families.get(family).encoder(key).subfolder}
    one_file = load_file(tmp_path / "cat-toy.safetensors")
    assert sorted(one_file) == sorted(list(vectors) + ["t5"])
    for key in vectors:
        np.testing.assert_array_equal(one_file[key], vectors[key])
    np.testing.assert_array_equal(one_file["t5"], vectors["t5xxl"])
    meta = metadata_of(tmp_path / "cat-toy.safetensors")
    assert meta["family"] == family and meta["token"] == TOKEN and meta["steps"] == "40"
    assert meta["dim_t5xxl"] == str(WIDTHS[family]["t5xxl"])
    assert not os.path.exists(tmp_path / "learned_embeds_4.safetensors")


def test_clip_only_runs_write_clip_parts_only(tmp_path):
    flux = flow_vectors("flux", ["clip_l"])
    embeddings.write_all(str(tmp_path / "flux"), TOKEN, flux, 4, "base", "object", export_formats=("kohya",),
                         family="flux")
    assert sorted(os.listdir(tmp_path / "flux")) == ["cat-toy.safetensors", "learned_embeds.bin",
                                                     "learned_embeds.safetensors", "token_identifier.txt",
                                                     "type_of_concept.txt"]
    assert list(load_file(tmp_path / "flux" / "cat-toy.safetensors")) == ["clip_l"]
    sd3 = flow_vectors("sd3", ["clip_l", "clip_g"])
    embeddings.write_all(str(tmp_path / "sd3"), TOKEN, sd3, 4, "base", "object", export_formats=("kohya",),
                         family="sd3")
    assert sorted(load_file(tmp_path / "sd3" / "cat-toy.safetensors")) == ["clip_g", "clip_l"]
    assert metadata_of(tmp_path / "sd3" / "cat-toy.safetensors")["family"] == "sd3"
    # Flux's clip_l alone has SD-1.x's shape: without the family the writers cannot tell them apart.
    with pytest.raises(ValueError):
        embeddings.write_diffusers(str(tmp_path), TOKEN, {"clip_l": flux["clip_l"]})


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_form_reads_back(tmp_path, family):
    vectors = flow_vectors(family)
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 40, "org/base", "object", export_formats=("kohya",),
                         family=family)
    widths = tuple(WIDTHS[family].values())
    for name in sorted(os.listdir(tmp_path)):
        if name.endswith((".safetensors", ".bin")):
            found = embeddings.load_model_embedding(str(tmp_path / name), family, widths)
            assert_same(found.vectors, vectors)
            assert found.family == family and found.token in (TOKEN, None)
    assert embeddings.embedding_family(str(tmp_path / "learned_embeds_2.bin")) is families.get(family)
    # --no_safe_serialization: .bin files only, which carry no metadata; read as the model's family.
    os.makedirs(tmp_path / "bin")
    embeddings.write_diffusers(str(tmp_path / "bin"), TOKEN, vectors, safe_serialization=False, family=family)
    assert_same(embeddings.load_model_embedding(str(tmp_path / "bin" / "learned_embeds.bin"), family, widths).vectors,
                vectors)


def test_widths_of_the_tiny_pipelines(tiny_sd3_pipeline, tiny_flux_pipeline):
    assert embeddings.text_encoder_widths(tiny_sd3_pipeline, "sd3") == tuple(SD3_WIDTHS.values())
    assert embeddings.text_encoder_widths(tiny_flux_pipeline, "flux") == tuple(FLUX_WIDTHS.values())


def test_onetrainer_and_comfyui_files_are_read(tmp_path):
    vectors = flow_vectors("flux")
    # OneTrainer's Flux file: clip_l and t5 (and its output embeddings' *_out keys, which we do not train).
    onetrainer = str(tmp_path / "onetrainer.safetensors")
    save_file({"clip_l": vectors["clip_l"], "t5": vectors["t5xxl"], "t5_out": np.zeros((2, 64), np.float32)}, onetrainer)
    assert_same(embeddings.load_model_embedding(onetrainer, "flux").vectors, vectors)
    t5_only = str(tmp_path / "t5-only.safetensors")
    save_file({"t5": vectors["t5xxl"]}, t5_only)
    assert_same(embeddings.load_model_embedding(t5_only, "flux").vectors, {"t5xxl": vectors["t5xxl"]})
    # ComfyUI-style file without our metadata.
    comfy = str(tmp_path / "comfy.safetensors")
    save_file({"t5xxl": vectors["t5xxl"], "clip_l": vectors["clip_l"]}, comfy)
    assert_same(embeddings.load_model_embedding(comfy, "flux").vectors, vectors)
    # One CLIP set (an SD-1.x file) is Flux's clip_l, but SD3 needs both CLIP sets.
    embeddings.write_embedding(str(tmp_path / "sd1.safetensors"), "kohya", TOKEN, vectors["clip_l"])
    assert_same(embeddings.load_model_embedding(str(tmp_path / "sd1.safetensors"), "flux").vectors,
                {"clip_l": vectors["clip_l"]})
    assert "clip_l and clip_g" in one_line_error(embeddings.load_model_embedding, str(tmp_path / "sd1.safetensors"), "sd3")


def test_the_key_choice_of_comfyui_and_onetrainer(tmp_path):
    """Our one file as ComfyUI's load_embed and OneTrainer's loader pick their parts (restated from their code):
    ComfyUI takes its encoder's key (clip_l, clip_g, t5xxl), else the file's first tensor, and drops a part whose
    width is not the encoder's; OneTrainer reads clip_l, clip_g and t5 (t5_out first, for output embeddings)."""
    vectors = flow_vectors("sd3")
    path = str(tmp_path / "cat-toy.safetensors")
    embeddings.write_single_file(path, TOKEN, vectors, 10, "base", family="sd3")
    data = load_file(path)

    def comfyui(key, width):
        part = data[key] if key in data else next(iter(data.values()))
        return part if part.shape[-1] == width else None

    for key in ("clip_l", "clip_g", "t5xxl"):
        np.testing.assert_array_equal(comfyui(key, SD3_WIDTHS[key]), vectors[key])
    np.testing.assert_array_equal(data.get("t5_out", data.get("t5")), vectors["t5xxl"])
    np.testing.assert_array_equal(data.get("clip_l_out", data.get("clip_l")), vectors["clip_l"])
    # OneTrainer's own file in ComfyUI loses its T5 part (no t5xxl key): what our extra key avoids.
    onetrainer = {"clip_l": vectors["clip_l"], "t5": vectors["t5xxl"]}
    assert (onetrainer["t5xxl"] if "t5xxl" in onetrainer else next(iter(onetrainer.values()))).shape[-1] != 96


@pytest.mark.parametrize("made_for, model", [("flux", "sd3"), ("sd3", "flux"), ("flux", "sdxl"), ("sd3", "sdxl"),
                                             ("flux", "sd"), ("sd3", "sd")])
def test_a_file_of_another_family_is_refused(tmp_path, made_for, model):
    vectors = flow_vectors(made_for)
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 4, "base", "object", export_formats=("kohya",), family=made_for)
    labels = {"flux": "Flux.1", "sd3": "SD3", "sdxl": "SDXL", "sd": "SD-1.x/2.x"}
    article = {"flux": "a", "sd3": "an"}
    for name in ("cat-toy.safetensors", "learned_embeds.safetensors", "learned_embeds_2.bin"):
        line = one_line_error(embeddings.load_model_embedding, str(tmp_path / name), model)
        assert f"is {article[made_for]} {labels[made_for]} embedding" in line, line
        assert f"this model is {labels[model]}" in line, line


def test_sdxl_files_fit_sd3_but_not_flux(tmp_path):
    rng = np.random.default_rng(3)
    sdxl = {"clip_l": rng.standard_normal((1, 32)).astype(np.float32), "clip_g": rng.standard_normal((1, 48)).astype(np.float32)}
    embeddings.write_all(str(tmp_path), TOKEN, sdxl, 4, "base", "object", export_formats=("kohya",))
    for name in ("cat-toy.safetensors", "learned_embeds_2.safetensors"):
        # SD3's CLIP encoders are SDXL's two (ComfyUI reads an SDXL embedding in SD3 alike).
        assert_same(embeddings.load_model_embedding(str(tmp_path / name), "sd3", (32, 48, 96)).vectors, sdxl)
    assert "SDXL" in one_line_error(embeddings.load_model_embedding, str(tmp_path / "cat-toy.safetensors"), "flux")
    # diffusers' files do not say their family: an SDXL pair's second file is not Flux's T5 by its width.
    line = one_line_error(embeddings.load_model_embedding, str(tmp_path / "learned_embeds_2.safetensors"), "flux",
                          (32, 64))
    assert "t5xxl 48 (the model's 64)" in line


def test_widths_are_checked(tmp_path):
    vectors = flow_vectors("flux")
    path = str(tmp_path / "cat-toy.safetensors")
    embeddings.write_single_file(path, TOKEN, vectors, 1, "base", family="flux")
    line = one_line_error(embeddings.load_model_embedding, path, "flux", {"clip_l": 32, "t5xxl": 4096})
    assert "t5xxl 64" in line and "4096" in line


def init_args(pipeline, path, enable_t5_ti, num_vectors=2):
    return argparse.Namespace(init_from=path, pretrained_model_name_or_path=pipeline, revision=None,
                              num_vectors=num_vectors, enable_t5_ti=enable_t5_ti)


def test_init_from_gives_one_set_per_trained_encoder(tmp_path, tiny_flux_pipeline, tiny_sd3_pipeline):
    flux = flow_vectors("flux")
    path = str(tmp_path / "flux.safetensors")
    embeddings.write_single_file(path, TOKEN, flux, 1, "base", family="flux")
    sets = preflight.read_init_from(init_args(tiny_flux_pipeline, path, True), "flux")
    assert [s.shape for s in sets] == [(2, 32), (2, 64)]
    np.testing.assert_array_equal(sets[1], flux["t5xxl"])
    sets = preflight.read_init_from(init_args(tiny_flux_pipeline, path, False), "flux")
    assert len(sets) == 1 and np.array_equal(sets[0], flux["clip_l"])
    # Once the model is loaded: the trained encoders' widths.
    assert len(preflight.fit_init_vectors(init_args(tiny_flux_pipeline, path, True), [flux["clip_l"]], [32, 64],
                                          family="flux")) == 2
    clip_only = str(tmp_path / "clip.safetensors")
    embeddings.write_single_file(clip_only, TOKEN, {"clip_l": flux["clip_l"]}, 1, "base", family="flux")
    line = one_line_error(preflight.read_init_from, init_args(tiny_flux_pipeline, clip_only, True), "flux")
    assert "no t5xxl part" in line and "without --enable_t5_ti" in line
    line = one_line_error(preflight.read_init_from, init_args(tiny_sd3_pipeline, path, False), "sd3")
    assert line.startswith("--init_from:") and "Flux.1" in line


def test_converter_keeps_every_part(tmp_path):
    vectors = flow_vectors("sd3")
    onetrainer = str(tmp_path / "in.safetensors")
    save_file({"clip_l": vectors["clip_l"], "clip_g": vectors["clip_g"], "t5": vectors["t5xxl"]}, onetrainer)
    # OneTrainer's file (T5 under t5 only) to ours: t5xxl added, so ComfyUI reads the T5 part too.
    _, written = convert.convert(onetrainer, str(tmp_path / "out.safetensors"), token=TOKEN)
    out = load_file(written[0])
    assert sorted(out) == ["clip_g", "clip_l", "t5", "t5xxl"]
    np.testing.assert_array_equal(out["t5xxl"], vectors["t5xxl"])
    # To the diffusers set and back.
    os.makedirs(tmp_path / "set")
    _, written = convert.convert(written[0], str(tmp_path / "set" / "learned_embeds.safetensors"))
    assert sorted(os.path.basename(p) for p in written) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors",
                                                             "learned_embeds_3.safetensors"]
    assert_same(embeddings.load_model_embedding(written[2], "sd3").vectors, vectors)
    _, written = convert.convert(written[1], str(tmp_path / "folder") + "/")
    assert "cat-toy.safetensors" in [os.path.basename(p) for p in written]
    # One part as a one-encoder embedding.
    _, written = convert.convert(onetrainer, str(tmp_path / "t5.safetensors"), dim=96)
    np.testing.assert_array_equal(load_file(written[0])["emb_params"], vectors["t5xxl"])
    assert "no SD3 .pt" in one_line_error(convert.convert, onetrainer, str(tmp_path / "x.pt"))
