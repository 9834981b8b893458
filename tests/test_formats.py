"""Embedding file formats: every writer reads back equal, the converter goes from any format to any
other, diffusers loads our files, and --init_from starts training from each readable format."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from conftest import REPO, base_args, run_script
from helpers import run_in_process
from textual_inversion_core import convert, embeddings
from textual_inversion_core.cli import parse_args
from textual_inversion_core.errors import UserError
from textual_inversion_core.preflight import load_run_inputs

TOKEN = "<cat-toy>"
TINY_DIM = 32  # hidden size of tools/make_tiny_pipeline.py --size tiny


def random_vectors(num_vectors, dim=TINY_DIM, seed=0):
    return np.random.default_rng(seed).standard_normal((num_vectors, dim)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Writers and readers


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_write_all_files_read_back_equal(tmp_path, num_vectors):
    vectors = random_vectors(num_vectors)
    written = embeddings.write_all(str(tmp_path), TOKEN, vectors, 42, "org/base-model", "style",
                                   export_formats=("a1111", "kohya"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["learned_embeds.bin", "learned_embeds.safetensors", "token_identifier.txt",
                            "type_of_concept.txt", "cat-toy.pt", "cat-toy.safetensors"])
    assert (tmp_path / "token_identifier.txt").read_text() == TOKEN
    assert (tmp_path / "type_of_concept.txt").read_text() == "style"
    expected = {  # file -> (kind, token, step, base model)
        "learned_embeds.safetensors": ("diffusers", TOKEN, None, None),
        "learned_embeds.bin": ("diffusers", TOKEN, None, None),
        "cat-toy.pt": ("a1111", "cat-toy", 42, "org/base-model"),
        "cat-toy.safetensors": ("kohya", TOKEN, 42, "org/base-model"),
    }
    for name, (kind, token, step, base) in expected.items():
        found = embeddings.load_embedding(str(tmp_path / name), expected_dim=TINY_DIM)
        assert (found.kind, found.token, found.step, found.base_model) == (kind, token, step, base), name
        assert found.vectors.dtype == np.float32 and found.vectors.shape == (num_vectors, TINY_DIM)
        np.testing.assert_array_equal(found.vectors, vectors, err_msg=name)


def test_export_formats_subset_writes_only_diffusers(tmp_path):
    embeddings.write_all(str(tmp_path), TOKEN, random_vectors(1), 1, "base", "object", export_formats=())
    assert sorted(os.listdir(tmp_path)) == ["learned_embeds.bin", "learned_embeds.safetensors",
                                            "token_identifier.txt", "type_of_concept.txt"]


def test_file_layouts_match_what_other_tools_expect(tmp_path):
    """The exact keys A1111, kohya/ComfyUI and diffusers look for, read with plain torch/safetensors."""
    vectors = random_vectors(2)
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 7, "org/base", "object", export_formats=("a1111", "kohya"),
                         base_model_hash="0123456789")
    a1111 = torch.load(tmp_path / "cat-toy.pt", weights_only=True)
    assert set(a1111) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert a1111["string_to_token"] == {"*": 265} and a1111["name"] == "cat-toy" and a1111["step"] == 7
    # As the webui's own trainer stores them: the model's name and a short hash.
    assert a1111["sd_checkpoint_name"] == "org/base" and a1111["sd_checkpoint"] == "0123456789"
    param = a1111["string_to_param"]["*"]
    assert param.dtype == torch.float32 and param.device.type == "cpu" and not param.requires_grad
    np.testing.assert_array_equal(param.numpy(), vectors)
    kohya = load_file(str(tmp_path / "cat-toy.safetensors"))
    assert list(kohya) == ["emb_params"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cat-toy.safetensors"), framework="np") as f:
        meta = f.metadata()
    assert meta["token"] == TOKEN and meta["base_model"] == "org/base" and meta["num_vectors"] == "2" and meta["steps"] == "7"
    assert meta["base_model_hash"] == "0123456789"
    diffusers_bin = torch.load(tmp_path / "learned_embeds.bin", weights_only=True)
    assert list(diffusers_bin) == [TOKEN] and diffusers_bin[TOKEN].shape == (2, TINY_DIM)


def test_reads_foreign_layouts(tmp_path):
    """1-D diffusers tensors, fp16, nn.Parameter A1111 files, SDXL clip_l/clip_g and a raw tensor."""
    one = random_vectors(1)
    torch.save({"<x>": torch.from_numpy(one[0].copy())}, tmp_path / "one_d.bin")
    token, got = embeddings.read_embedding(str(tmp_path / "one_d.bin"))
    assert token == "<x>" and got.shape == (1, TINY_DIM)
    np.testing.assert_array_equal(got, one)

    half = random_vectors(2).astype(np.float16)
    save_torch_file({"<h>": torch.from_numpy(half)}, str(tmp_path / "half.safetensors"))
    np.testing.assert_array_equal(embeddings.read_embedding(str(tmp_path / "half.safetensors"))[1], half.astype(np.float32))

    param = torch.nn.Parameter(torch.from_numpy(random_vectors(2)))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": "thing", "step": 3},
               tmp_path / "webui.pt")
    found = embeddings.load_embedding(str(tmp_path / "webui.pt"))
    assert found.kind == "a1111" and found.token == "thing" and found.step == 3
    np.testing.assert_array_equal(found.vectors, param.detach().numpy())

    clip_l, clip_g = random_vectors(2, 768, seed=1), random_vectors(2, 1280, seed=2)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "sdxl.safetensors"))
    np.testing.assert_array_equal(embeddings.read_embedding(str(tmp_path / "sdxl.safetensors"), 1280)[1], clip_g)
    np.testing.assert_array_equal(embeddings.read_embedding(str(tmp_path / "sdxl.safetensors"), 768)[1], clip_l)
    with pytest.raises(UserError, match="no part of width 32 .*clip_l=768, clip_g=1280"):
        embeddings.read_embedding(str(tmp_path / "sdxl.safetensors"), TINY_DIM)

    # A safetensors file under a pickle-style name is recognised by its content, not its suffix.
    misnamed = random_vectors(2)
    save_file({"<m>": misnamed}, str(tmp_path / "misnamed.bin"))
    np.testing.assert_array_equal(embeddings.read_embedding(str(tmp_path / "misnamed.bin"))[1], misnamed)

    raw = random_vectors(4)
    torch.save(torch.from_numpy(raw), tmp_path / "raw.pt")
    found = embeddings.load_embedding(str(tmp_path / "raw.pt"))
    assert found.kind == "raw" and found.token is None
    np.testing.assert_array_equal(found.vectors, raw)


def test_unreadable_files_give_one_line_errors(tmp_path):
    import argparse

    # Unpickling an arbitrary class could run code: weights_only refuses it.
    torch.save({"<x>": argparse.Namespace(vectors=[1.0])}, tmp_path / "evil.pt")
    save_file({"a": random_vectors(1), "b": random_vectors(1)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    torch.save(torch.zeros(2, 3, 4), tmp_path / "cube.pt")
    cases = {
        "evil.pt": "cannot read embedding file .* safely",
        "two.safetensors": "holds 2 tensors",
        "broken.safetensors": "cannot read .* as safetensors",
        "cube.pt": r"shape \(2, 3, 4\), expected \[num_vectors, dim\]",
        "missing.pt": "does not exist",
    }
    for name, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as info:
            embeddings.read_embedding(str(tmp_path / name))
        assert "\n" not in str(info.value), name
    save_file({"<x>": random_vectors(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UserError, match="width 768 does not match the text encoder's 32"):
        embeddings.read_embedding(str(tmp_path / "wide.safetensors"), expected_dim=TINY_DIM)


# --------------------------------------------------------------------------------------------------
# The base model: named by hub id or folder name, hashed by its text-encoder weights


def sha256_prefix(*paths):
    digest = hashlib.sha256()
    for path in paths:
        digest.update(open(path, "rb").read())
    return digest.hexdigest()[:10]


def test_local_base_model_is_its_folder_name_and_text_encoder_hash(tiny_pipeline, tmp_path, monkeypatch):
    weights = os.path.join(tiny_pipeline, "text_encoder", "model.safetensors")
    assert embeddings.public_model_name(tiny_pipeline) == "tiny"
    assert embeddings.public_model_name(tiny_pipeline + "/") == "tiny"
    monkeypatch.chdir(os.path.dirname(tiny_pipeline))
    assert embeddings.public_model_name("./tiny") == "tiny"
    assert embeddings.text_encoder_short_hash(tiny_pipeline) == sha256_prefix(weights)

    # Sharded weights hash in shard order; a --variant's file is preferred over the plain one.
    model = tmp_path / "sharded"
    (model / "text_encoder").mkdir(parents=True)
    for name, data in {"model-00002-of-00002.safetensors": b"second", "model-00001-of-00002.safetensors": b"first",
                       "model.fp16.safetensors": b"half"}.items():
        (model / "text_encoder" / name).write_bytes(data)
    (model / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    shards = [str(model / "text_encoder" / f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]
    assert embeddings.text_encoder_short_hash(str(model)) == sha256_prefix(*shards)
    assert embeddings.text_encoder_short_hash(str(model), variant="fp16") == sha256_prefix(
        str(model / "text_encoder" / "model.fp16.safetensors"))
    assert embeddings.text_encoder_short_hash(str(tmp_path / "no-such-model")) is None


def test_hub_base_model_is_its_id_and_the_cached_text_encoder_hash(tmp_path, monkeypatch):
    """A hub id stays as it is; the hash is of the text encoder in the local Hub cache (the files the run used)."""
    import huggingface_hub.constants as hf_constants

    commit = "a" * 40
    repo_cache = tmp_path / "hub" / "models--some-org--some-model"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(commit)
    weights = repo_cache / "snapshots" / commit / "text_encoder" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"text encoder weights")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert embeddings.public_model_name("some-org/some-model") == "some-org/some-model"
    assert embeddings.text_encoder_short_hash("some-org/some-model") == sha256_prefix(str(weights))
    assert embeddings.text_encoder_short_hash("some-org/not-downloaded") is None


def test_files_made_elsewhere_lose_the_path_of_their_base_model(tmp_path):
    """An A1111 file as older tools wrote it names the model by a local path: converted files keep only its name."""
    vectors = random_vectors(2)
    source = str(tmp_path / "old.pt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)}, "name": "old",
                "step": 3, "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "/home/someone/models/sd15"}, source)
    token, written = convert.convert(source, str(tmp_path / "out") + "/")
    for path in written:
        assert b"/home/someone" not in open(path, "rb").read(), path
    for name in ("old.pt", "old.safetensors"):
        found = embeddings.load_embedding(str(tmp_path / "out" / name))
        assert (found.base_model, found.base_model_hash, found.step) == ("sd15", "abcdef0123", 3), name
    for written_name, expected in {"C:\\Users\\me\\sd15": "sd15", "~/models/sd15/": "sd15", "org/model": "org/model",
                                   "": None}.items():
        embeddings.write_a1111(str(tmp_path / "x.pt"), TOKEN, vectors, 1, written_name)
        assert embeddings.load_embedding(str(tmp_path / "x.pt")).base_model == expected, written_name


def readme_paragraph(start):
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    return text[text.index(start):].split("\n\n")[0]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_readme_says_which_files_no_safe_serialization_writes(tmp_path, sdxl):
    """Every file the run's end writes with --no_safe_serialization and the default --export_formats is named where
    the README describes the flag (it once said only .bin files were written, but <name>.safetensors is too)."""
    from textual_inversion_core.cli import EXPORT_FORMATS

    vectors = {"clip_l": random_vectors(2, 32), "clip_g": random_vectors(2, 48)} if sdxl else random_vectors(2)
    written = embeddings.write_all(str(tmp_path), TOKEN, vectors, 3, "base", "object", export_formats=EXPORT_FORMATS,
                                   safe_serialization=False)
    paragraph = readme_paragraph("With `--no_safe_serialization`")
    embedding_files = [os.path.basename(p) for p in written if not p.endswith(".txt")]
    assert any(name.endswith(".safetensors") for name in embedding_files)
    for name in embedding_files:
        assert f"`{name.replace('cat-toy', '<name>')}`" in paragraph, (name, paragraph)


# --------------------------------------------------------------------------------------------------
# Converter


SOURCE_NAMES = {"diffusers": "learned_embeds.safetensors", "diffusers-bin": "learned_embeds.bin",
                "a1111": "cat-toy.pt", "kohya": "cat-toy.safetensors", "raw": "tensor.pt"}
# Which formats carry which token: A1111 stores the bare trigger word, a raw tensor none.
TOKEN_AFTER = {"diffusers": TOKEN, "diffusers-bin": TOKEN, "a1111": "cat-toy", "kohya": TOKEN, "raw": None}


@pytest.mark.parametrize("source", sorted(SOURCE_NAMES))
def test_converter_any_format_to_any_other(tmp_path, source):
    vectors = random_vectors(3, seed=5)
    src = str(tmp_path / SOURCE_NAMES[source])
    embeddings.write_embedding(src, source, TOKEN, vectors, step=9, base_model="org/base")
    for target in embeddings.WRITE_FORMATS:
        suffix = {"diffusers": "safetensors", "kohya": "safetensors", "diffusers-bin": "bin"}.get(target, "pt")
        out = str(tmp_path / f"out-{target}" / f"converted.{suffix}")
        os.makedirs(os.path.dirname(out))
        token, written = convert.convert(src, out, fmt=target)
        assert written == [out]
        found = embeddings.load_embedding(out)
        assert found.kind == ("diffusers" if target.startswith("diffusers") else target)
        np.testing.assert_array_equal(found.vectors, vectors, err_msg=f"{source} -> {target}")
        if source != "raw":
            assert token == TOKEN_AFTER[source]
        if TOKEN_AFTER[target] is not None and TOKEN_AFTER[source] is not None:
            assert found.token in (TOKEN_AFTER[source], embeddings.file_stem_for_token(TOKEN_AFTER[source]))
        if target in ("a1111", "kohya") and source in ("a1111", "kohya"):
            assert (found.step, found.base_model) == (9, "org/base")


def test_converter_guesses_format_from_name_and_writes_folders(tmp_path):
    vectors = random_vectors(2)
    src = str(tmp_path / "cat-toy.pt")
    embeddings.write_a1111(src, TOKEN, vectors, 3, "base")
    assert convert.convert(src, str(tmp_path / "learned_embeds.safetensors"), token=TOKEN)[0] == TOKEN
    assert embeddings.load_embedding(str(tmp_path / "learned_embeds.safetensors")).kind == "diffusers"
    convert.convert(src, str(tmp_path / "comfy.safetensors"))
    assert embeddings.load_embedding(str(tmp_path / "comfy.safetensors")).kind == "kohya"
    convert.convert(src, str(tmp_path / "again.bin"))
    assert embeddings.load_embedding(str(tmp_path / "again.bin")).kind == "diffusers"
    token, written = convert.convert(str(tmp_path / "comfy.safetensors"), str(tmp_path / "folder") + "/", token="<new-name>")
    assert token == "<new-name>"
    assert sorted(os.listdir(tmp_path / "folder")) == ["learned_embeds.bin", "learned_embeds.safetensors", "new-name.pt",
                                                      "new-name.safetensors", "token_identifier.txt", "type_of_concept.txt"]
    with pytest.raises(UserError, match="cannot tell the output format"):
        convert.convert(src, str(tmp_path / "out.txt"))
    with pytest.raises(UserError, match="same file"):
        convert.convert(src, src)
    with pytest.raises(UserError, match="without spaces"):
        convert.convert(src, str(tmp_path / "x.pt"), token="two words")


@pytest.mark.parametrize("fmt, name, message", [
    ("kohya", "x.pt", "--format kohya writes safetensors, but OUT 'x.pt' ends in .pt: tools would fail to load it; "
                      "name it x.safetensors, or drop --format to write what the name says (a1111)"),
    ("diffusers", "learned_embeds.bin", "name it learned_embeds.safetensors, or drop --format"),
    ("a1111", "x.safetensors", "--format a1111 writes a torch pickle, but OUT 'x.safetensors' ends in .safetensors"),
    ("diffusers-bin", "learned_embeds.safetensors", "name it learned_embeds.bin"),
    ("raw", "tensor", "OUT 'tensor' has no extension: tools would fail to load it; name it tensor.pt"),
    ("a1111", "out/", "--format a1111 writes one file but OUT 'out' is a folder"),
])
def test_converter_refuses_a_name_that_contradicts_the_format(tmp_path, fmt, name, message):
    """The webui, ComfyUI and InvokeAI choose how to read a file by its extension: safetensors bytes in a .pt (or a
    pickle in a .safetensors) would fail to load there, so the converter does not write them."""
    src = embeddings.write_a1111(str(tmp_path / "cat-toy.pt"), TOKEN, random_vectors(2), 3, "base")
    out = os.path.join(str(tmp_path), name)  # "out/" keeps its slash: a folder
    with pytest.raises(UserError) as info:
        convert.convert(src, out, fmt=fmt)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == ["cat-toy.pt"]


def test_converter_writes_each_format_under_each_of_its_names(tmp_path):
    vectors = random_vectors(2, seed=4)
    src = embeddings.write_a1111(str(tmp_path / "cat-toy.pt"), TOKEN, vectors, 3, "base")
    for fmt, names in convert.EXTENSIONS.items():
        for ext in names:
            out = str(tmp_path / fmt / f"out{ext}")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            assert convert.convert(src, out, fmt=fmt)[1] == [out]
            np.testing.assert_array_equal(embeddings.load_embedding(out).vectors, vectors)


def test_converter_command_line(tmp_path):
    """`python -m textual_inversion_core.convert IN OUT` as a user runs it; bad input is one line, exit 2."""
    vectors = random_vectors(2)
    save_file({"clip_l": random_vectors(2, 768), "clip_g": vectors}, str(tmp_path / "sdxl.safetensors"))
    env = dict(os.environ, PYTHONPATH=REPO)
    ok = subprocess.run([sys.executable, "-m", "textual_inversion_core.convert", str(tmp_path / "sdxl.safetensors"),
                         str(tmp_path / "g.pt"), "--dim", "32", "--token", "<g>"],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "g.pt" in ok.stdout and "<g>" in ok.stdout
    found = embeddings.load_embedding(str(tmp_path / "g.pt"))
    assert found.kind == "a1111" and found.token == "g"
    np.testing.assert_array_equal(found.vectors, vectors)
    bad = subprocess.run([sys.executable, "-m", "textual_inversion_core.convert", str(tmp_path / "nope.pt"),
                          str(tmp_path / "out.pt")], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


# --------------------------------------------------------------------------------------------------
# diffusers loads what we write


def test_diffusers_load_textual_inversion_gives_same_prompt_embeddings(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    vectors = random_vectors(3, seed=11)
    embeddings.write_all(str(tmp_path), TOKEN, vectors, 5, tiny_pipeline, "object", export_formats=("a1111", "kohya"))
    embeddings.write_diffusers(str(tmp_path), TOKEN, vectors, suffix="-steps-5")
    os.makedirs(tmp_path / "converted")
    for name in ("webui.pt", "learned_embeds.bin"):
        convert.convert(str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "converted" / name))

    def prompt_embeds(source, token_in_prompt, **load_kwargs):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)
        pipe.load_textual_inversion(source, **load_kwargs)
        loaded = pipe.text_encoder.get_input_embeddings().weight
        ids = pipe.tokenizer.convert_tokens_to_ids(
            [token_in_prompt] + [f"{token_in_prompt}_{i}" for i in range(1, len(vectors))])
        np.testing.assert_array_equal(loaded[ids].detach().numpy(), vectors)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(f"a photo of {token_in_prompt} on a table", "cpu", 1, False)
        return embeds.numpy()

    from_folder = prompt_embeds(str(tmp_path), TOKEN)  # picks learned_embeds.safetensors
    from_bin = prompt_embeds(str(tmp_path / "learned_embeds.bin"), TOKEN)
    from_a1111 = prompt_embeds(str(tmp_path / "cat-toy.pt"), "cat-toy")  # A1111 carries the bare name
    from_a1111_named = prompt_embeds(str(tmp_path / "cat-toy.pt"), TOKEN, token=TOKEN)
    from_kohya = prompt_embeds(str(tmp_path / "cat-toy.safetensors"), TOKEN, token=TOKEN)
    np.testing.assert_array_equal(from_folder, from_bin)
    np.testing.assert_array_equal(from_folder, prompt_embeds(str(tmp_path / "learned_embeds-steps-5.bin"), TOKEN))
    np.testing.assert_array_equal(from_folder, prompt_embeds(str(tmp_path / "converted" / "learned_embeds.bin"), TOKEN))
    np.testing.assert_array_equal(from_folder, prompt_embeds(str(tmp_path / "converted" / "webui.pt"), TOKEN, token=TOKEN))
    np.testing.assert_array_equal(from_folder, from_a1111_named)
    np.testing.assert_array_equal(from_folder, from_kohya)
    # "cat-toy" and "<cat-toy>" tokenise their neighbours alike, so the embeddings match too.
    np.testing.assert_allclose(from_folder, from_a1111, rtol=0, atol=1e-6)
    plain = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        without, _ = plain.encode_prompt("a photo of toy on a table", "cpu", 1, False)
    assert not np.allclose(without.numpy(), from_folder)


# --------------------------------------------------------------------------------------------------
# --init_from


def init_args(tiny_pipeline, train_images, output_dir, init_from, num_vectors=2, **extra):
    return base_args(tiny_pipeline, train_images, str(output_dir), init_from=init_from, num_vectors=num_vectors,
                     max_train_steps=1, learning_rate=1e-9, train_batch_size=1, **extra)


def write_every_readable_format(folder, vectors):
    """{name: path} of every layout --init_from accepts, all holding `vectors`."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for fmt in embeddings.WRITE_FORMATS:
        name = {"diffusers": "learned_embeds.safetensors", "diffusers-bin": "learned_embeds.bin", "a1111": "webui.pt",
                "kohya": "comfy.safetensors", "raw": "raw.pt"}[fmt]
        paths[fmt] = embeddings.write_embedding(os.path.join(folder, name), fmt, TOKEN, vectors, 1, "base")
    paths["clip"] = os.path.join(folder, "sdxl.safetensors")
    save_file({"clip_l": random_vectors(len(vectors), 768), "clip_g": vectors}, paths["clip"])
    return paths


def test_init_from_every_format_is_read_before_models(tiny_pipeline, train_images, tmp_path):
    vectors = random_vectors(2, seed=3)
    paths = write_every_readable_format(str(tmp_path / "inits"), vectors)
    for fmt, path in paths.items():
        args = parse_args(init_args(tiny_pipeline, train_images, tmp_path / f"out-{fmt}", path))
        if fmt == "clip":  # an SDXL file for an SD-1.x model: refused in one line, before any model loads
            with pytest.raises(UserError, match=r"--init_from: .*is an SDXL embedding .*this model is SD-1.x/2.x") as info:
                load_run_inputs(args)
            assert "\n" not in str(info.value) and "--dim 32" in str(info.value)
            continue
        (got,) = load_run_inputs(args).init_vectors  # one array per text encoder
        np.testing.assert_array_equal(got, vectors, err_msg=fmt)
    args = parse_args(init_args(tiny_pipeline, train_images, tmp_path / "out-n", paths["a1111"], num_vectors=3))
    with pytest.raises(UserError, match=r"has 2 vectors but --num_vectors is 3; pass --num_vectors 2") as info:
        load_run_inputs(args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["a1111", "kohya"])
def test_training_starts_from_init_from(tiny_pipeline, train_images, tmp_path, fmt):
    """A real run: with a vanishing learning rate the saved embedding is the --init_from one."""
    vectors = random_vectors(2, seed=4)
    paths = write_every_readable_format(str(tmp_path / "inits"), vectors)
    result = run_in_process(init_args(tiny_pipeline, train_images, tmp_path / "out", paths[fmt]))
    assert result.returncode == 0, result.stderr[-3000:]
    token, learned = embeddings.read_embedding(str(tmp_path / "out" / "learned_embeds.safetensors"))
    assert token == TOKEN
    np.testing.assert_allclose(learned, vectors, rtol=0, atol=1e-6)


def test_init_from_width_mismatch_is_one_line(tiny_pipeline, train_images, tmp_path):
    wide = str(tmp_path / "wide.safetensors")
    save_file({TOKEN: random_vectors(2, 768)}, wide)
    result = run_script(init_args(tiny_pipeline, train_images, tmp_path / "out", wide))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--init_from" in last and "width 768 does not match the text encoder's 32" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out" / "learned_embeds.safetensors")
