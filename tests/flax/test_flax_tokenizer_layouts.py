"""The Flax trainer (transformers 4.57) reads a tokenizer saved by transformers 5, which keeps only tokenizer.json:
transformers 4.57's CLIPTokenizer needs vocab.json + merges.txt, so such a folder gets CLIPTokenizerFast, with the
same ids, placeholder tokens and refusals. A tokenizer folder with neither layout is one line naming what is missing."""

import os
import shutil

import numpy as np
import pytest

import textual_inversion_flax as ti_flax
from helpers import flax_base_args, read_vectors, run_flax_in_process, run_torch_python
from textual_inversion_core.errors import UserError
from textual_inversion_core.tokenizer_files import load_clip_tokenizer
from textual_inversion_core.tokens import add_placeholder_tokens

PROMPTS = ["a photo of a toy", "A Painting in the style of <cat-toy>, café naïve!!", "rock'n'roll don't",
           "  extra   spaces\tand\nnewlines ", "x" * 300]


def resave_tokenizers_with_transformers5(pipeline, destination, folders=("tokenizer",)):
    """A copy of pipeline whose tokenizer folders are what transformers 5 (.venv) saves: tokenizer.json, no vocab.json."""
    shutil.copytree(pipeline, destination)
    for folder in folders:
        shutil.rmtree(os.path.join(destination, folder))
        names = run_torch_python(
            "import json, os, sys\n"
            "from transformers import CLIPTokenizer\n"
            "CLIPTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\n"
            "print(json.dumps(sorted(os.listdir(sys.argv[2]))))\n",
            os.path.join(pipeline, folder), os.path.join(destination, folder))
        assert "tokenizer.json" in names and "vocab.json" not in names and "merges.txt" not in names, names
    return str(destination)


@pytest.fixture(scope="module")
def json_only_pipeline(tiny_pipeline, tmp_path_factory):
    return resave_tokenizers_with_transformers5(tiny_pipeline, tmp_path_factory.mktemp("layouts") / "json-only")


def refusals(tokenizer_folder):
    """The lines add_placeholder_tokens refuses with, for a fresh tokenizer of the folder each time."""
    lines = []
    for placeholder, initializer in [("toy", "toy"), ("<|endoftext|>", "toy"), ("<cat-toy>", "toyotacorollahatchback")]:
        with pytest.raises(UserError) as info:
            add_placeholder_tokens(load_clip_tokenizer(tokenizer_folder), placeholder, 1, initializer)
        lines.append(str(info.value))
    return lines


def test_tokenizer_json_alone_tokenizes_as_vocab_json(tiny_pipeline, json_only_pipeline):
    slow = load_clip_tokenizer(os.path.join(tiny_pipeline, "tokenizer"))
    fast = load_clip_tokenizer(os.path.join(json_only_pipeline, "tokenizer"))
    assert (type(slow).__name__, type(fast).__name__) == ("CLIPTokenizer", "CLIPTokenizerFast")
    assert len(slow) == len(fast) == 49408 and fast.model_max_length == 77
    for prompt in PROMPTS:
        assert slow(prompt, padding="max_length", truncation=True, max_length=77).input_ids == \
            fast(prompt, padding="max_length", truncation=True, max_length=77).input_ids, prompt
    assert add_placeholder_tokens(slow, "<cat-toy>", 3, "toy") == add_placeholder_tokens(fast, "<cat-toy>", 3, "toy") \
        == ([49408, 49409, 49410], [5988])
    assert fast("a <cat-toy>_1 toy").input_ids == slow("a <cat-toy>_1 toy").input_ids == [49406, 320, 49409, 5988, 49407]
    assert refusals(os.path.join(tiny_pipeline, "tokenizer")) == refusals(os.path.join(json_only_pipeline, "tokenizer"))


def test_sdxl_tokenizers_saved_by_transformers5_load(tiny_sdxl_pipeline, tmp_path):
    folder = resave_tokenizers_with_transformers5(tiny_sdxl_pipeline, tmp_path / "sdxl", ("tokenizer", "tokenizer_2"))
    first = load_clip_tokenizer(folder, subfolder="tokenizer")
    second = load_clip_tokenizer(folder, subfolder="tokenizer_2")
    assert type(second).__name__ == "CLIPTokenizerFast"
    assert (first.pad_token_id, second.pad_token, second.pad_token_id) == (49407, "!", 0)
    assert second("a toy", padding="max_length", max_length=6).input_ids == [49406, 320, 5988, 49407, 0, 0]


def test_trainer_gives_the_same_vectors_from_tokenizer_json_alone(tiny_pipeline, json_only_pipeline, train_images,
                                                                 compile_cache, tmp_path):
    import jax

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    learned = []
    for model in (json_only_pipeline, tiny_pipeline):
        out = str(tmp_path / f"out-{len(learned)}")
        assert ti_flax.main(flax_base_args(model, train_images, out, max_train_steps=2)) == 0
        learned.append(read_vectors(os.path.join(out, "learned_embeds.safetensors")))
    np.testing.assert_array_equal(learned[0], learned[1])


def test_sdxl_trainer_gives_the_same_vectors_from_tokenizer_json_alone(tiny_sdxl_pipeline, train_images, compile_cache,
                                                                      tmp_path):
    """Both SDXL tokenizers saved by transformers 5: each encoder's set as from vocab.json + merges.txt."""
    single = resave_tokenizers_with_transformers5(tiny_sdxl_pipeline, tmp_path / "sdxl", ("tokenizer", "tokenizer_2"))
    learned = []
    for model in (single, tiny_sdxl_pipeline):
        out = str(tmp_path / f"out-{len(learned)}")
        run_flax_in_process(flax_base_args(model, train_images, out, max_train_steps=2), cache=compile_cache)
        learned.append([read_vectors(os.path.join(out, name))
                        for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors")])
    assert [v.shape for v in learned[0]] == [(2, 32), (2, 48)]
    for from_json, from_vocab in zip(*learned):
        np.testing.assert_array_equal(from_json, from_vocab)


def test_trainer_refuses_a_tokenizer_folder_with_neither_layout(tiny_pipeline, train_images, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_pipeline, model)
    os.unlink(os.path.join(model, "tokenizer", "merges.txt"))
    with pytest.raises(UserError) as info:
        ti_flax.main(flax_base_args(model, train_images, str(tmp_path / "out")))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no tokenizer in "), message
    assert os.path.join(model, "tokenizer") in message and "missing merges.txt" in message, message


def hub_cache_holding(cache, repo_id, source, names):
    """A Hugging Face cache in which repo_id's tokenizer/ folder holds only the files names (copied from source)."""
    commit = "c" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "tokenizer").mkdir(parents=True)
    for name in names:
        shutil.copy(os.path.join(source, name), repo / "snapshots" / commit / "tokenizer" / name)
    return str(cache)


def test_hub_id_with_tokenizer_json_alone_loads_from_the_cache(json_only_pipeline, tmp_path):
    """A hub model whose repo has only tokenizer.json, as downloaded before (offline): the fast class; a hub model
    not downloaded, offline: one line saying so instead of transformers 4.57's TypeError."""
    import subprocess
    import sys

    from helpers import REPO

    cache = hub_cache_holding(tmp_path / "hub", "some-org/json-only", os.path.join(json_only_pipeline, "tokenizer"),
                              ("tokenizer.json", "tokenizer_config.json"))
    code = ("import sys\n"
            "from textual_inversion_core.errors import UserError\n"
            "from textual_inversion_core.tokenizer_files import load_clip_tokenizer\n"
            "for repo_id in sys.argv[1:]:\n"
            "    try:\n"
            "        tokenizer = load_clip_tokenizer(repo_id, subfolder='tokenizer')\n"
            "        print(type(tokenizer).__name__, tokenizer('a photo of a toy').input_ids)\n"
            "    except UserError as err:\n"
            "        print('UserError', err)\n")
    # In a subprocess: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported.
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code, "some-org/json-only", "some-org/not-downloaded"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = result.stdout.strip().splitlines()[-2:]
    assert found[0] == "CLIPTokenizerFast [49406, 320, 1125, 539, 320, 5988, 49407]", found
    assert found[1].startswith("UserError the tokenizer files of some-org/not-downloaded/tokenizer on the Hub are not "
                               "on this machine and could not be downloaded"), found
