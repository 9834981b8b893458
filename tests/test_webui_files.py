""".pt/.bin files pass the AUTOMATIC1111 webui's safe-loader checks (restated in webui_safe_loader.py) and still
load with torch.load(weights_only=True); the checks themselves refuse what the webui refuses."""

import argparse
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from textual_inversion_core import convert, embeddings
from webui_safe_loader import Refused, check_file, pickled_files

TOKEN = "<cat-toy>"


def random_vectors(num_vectors, dim=32, seed=0):
    return np.random.default_rng(seed).standard_normal((num_vectors, dim)).astype(np.float32)


def assert_webui_accepts_and_torch_reads(path, vectors):
    """The webui's checks pass, and the tensor read back with weights_only=True is the written one."""
    seen = check_file(path)
    assert seen["storages"] == 1, (path, seen)  # the one embedding tensor was seen, as a ('storage', ...) id
    assert "torch._utils._rebuild_tensor_v2" in seen["globals"], (path, seen)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "string_to_param" in loaded:
        loaded = loaded["string_to_param"]["*"]
    elif isinstance(loaded, dict):
        (loaded,) = loaded.values()
    np.testing.assert_array_equal(loaded.numpy(), vectors, err_msg=path)
    return seen


# --------------------------------------------------------------------------------------------------
# The checks bite


def _zip_with(tmp_path, entries):
    path = str(tmp_path / "crafted.pt")
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_the_rules_refuse_what_the_webui_refuses(tmp_path):
    plain = pickle.dumps({"step": 1}, protocol=2)
    accepted = _zip_with(tmp_path, {"archive/data.pkl": plain, "archive/version": b"3\n", "archive/byteorder": b"little",
                                    "archive/data/0": b"\0" * 8, "archive/.data/serialization_id": b"1"})
    assert check_file(accepted)["layout"] == "zip"
    with pytest.raises(Refused, match=r"archive/\.format_version"):
        check_file(_zip_with(tmp_path, {"archive/data.pkl": plain, "archive/.format_version": b"1"}))
    with pytest.raises(Refused, match="2 data.pkl"):
        check_file(_zip_with(tmp_path, {"a/data.pkl": plain, "b/data.pkl": plain}))

    # The layout torch.save writes by default (what .pt/.bin files had before): refused for its extra entries.
    default_zip = str(tmp_path / "default.pt")
    torch.save({TOKEN: torch.zeros(1, 4)}, default_zip)
    with pytest.raises(Refused, match=r"\.format_version|\.storage_alignment"):
        check_file(default_zip)

    # Legacy layout: any global outside the list, or a persistent id other than ('storage', ...), is refused.
    evil = str(tmp_path / "evil.pt")
    torch.save({TOKEN: argparse.Namespace(x=1)}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(Refused, match="global argparse.Namespace"):
        check_file(evil)

    class OtherPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "marker" else None

    buffer = io.BytesIO()
    OtherPersistentIds(buffer, protocol=2).dump({"x": "marker"})
    (tmp_path / "pid.pt").write_bytes(buffer.getvalue())
    with pytest.raises(Refused, match="persistent id"):
        check_file(str(tmp_path / "pid.pt"))
    (tmp_path / "text.pt").write_bytes(b"not a pickle")
    with pytest.raises(Refused, match="not a readable pickle"):
        check_file(str(tmp_path / "text.pt"))


# --------------------------------------------------------------------------------------------------
# What we write passes


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_end_of_run_and_step_files_pass_the_webui_checks(tmp_path, num_vectors):
    vectors = random_vectors(num_vectors)
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 42, "org/base-model", "object",
                         export_formats=("a1111", "kohya"))
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors, suffix="-steps-42")
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors, safe_serialization=False, suffix="-steps-43")
    found = pickled_files(str(tmp_path))
    assert found == ["cat-toy.pt", "learned_embeds-steps-42.bin", "learned_embeds-steps-43.bin", "learned_embeds.bin"]
    for name in found:
        assert assert_webui_accepts_and_torch_reads(str(tmp_path / name), vectors)["layout"] == "legacy"


def test_every_converter_output_passes_the_webui_checks(tmp_path):
    vectors = random_vectors(2, seed=3)
    # The converter's input is a file as torch.save writes it by default, as files from elsewhere often are.
    source = str(tmp_path / "downloaded.pt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors.copy())},
                "name": "cat-toy", "step": 9}, source)
    outputs = {"a1111": "webui.pt", "diffusers-bin": "learned_embeds.bin", "raw": "tensor.pt"}
    for fmt, name in outputs.items():
        out = str(tmp_path / "single" / name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        assert convert.convert(source, out, fmt=fmt)[1] == [out]
    convert.convert(source, str(tmp_path / "folder") + "/")
    for folder in ("single", "folder"):
        found = pickled_files(str(tmp_path / folder))
        assert found == sorted(outputs.values() if folder == "single" else ["cat-toy.pt", "learned_embeds.bin"])
        for name in found:
            assert_webui_accepts_and_torch_reads(str(tmp_path / folder / name), vectors)


# --------------------------------------------------------------------------------------------------
# InvokeAI: which of our files its install check accepts (README "Use your embedding")


def invokeai_token_width(path):
    """InvokeAI's install check for a textual inversion file (TextualInversionConfigBase._get_base_or_raise, v6),
    restated: the width it reads, from which it picks the base model (768 SD-1, 1024 SD-2, 1280 SDXL; else refused).
    A {token: tensor} file's width is read from the tensor's first dimension."""
    from safetensors.torch import load_file

    data = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_token" in data:
        return next(iter(data["string_to_param"].values())).shape[-1]
    if "emb_params" in data:
        return data["emb_params"].shape[-1]
    if "clip_g" in data:
        return data["clip_g"].shape[-1]
    return next(iter(data.values())).shape[0]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_invokeai_takes_the_pt_and_safetensors_files_but_not_learned_embeds(tmp_path, sdxl):
    vectors = {"clip_l": random_vectors(3, 768), "clip_g": random_vectors(3, 1280)} if sdxl else random_vectors(3, 768)
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 7, "base", "object", export_formats=("a1111", "kohya"))
    width = 1280 if sdxl else 768
    installable = ["cat-toy.safetensors"] + ([] if sdxl else ["cat-toy.pt"])
    for name in installable:
        assert invokeai_token_width(str(tmp_path / name)) == width, name
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        assert invokeai_token_width(str(tmp_path / name)) == 3, name  # the number of vectors: refused
    if sdxl:  # the converter's SDXL .pt is taken too
        os.makedirs(tmp_path / "webui")
        convert.convert(str(tmp_path / "cat-toy.safetensors"), str(tmp_path / "webui" / "cat-toy.pt"))
        assert invokeai_token_width(str(tmp_path / "webui" / "cat-toy.pt")) == 1280
