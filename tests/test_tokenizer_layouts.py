"""The two tokenizer layouts a pipeline folder may hold (vocab.json + merges.txt, or only tokenizer.json, which
pipelines saved by transformers 5 keep) load the same tokenizer, the PyTorch trainer trains on either, and a
tokenizer folder with neither stops the run with one line naming the folder and the missing files."""

import os
import shutil

import numpy as np
import pytest

from helpers import base_args, read_vectors, run_script
from textual_inversion_core.errors import UserError
from textual_inversion_core.tokenizer_files import load_clip_tokenizer, tokenizer_layout
from textual_inversion_core.tokens import add_placeholder_tokens

VOCAB_LAYOUT = ("vocab.json", "merges.txt")
JSON_LAYOUT = ("tokenizer.json",)
CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
PROMPTS = ["a photo of a toy", "A Painting in the style of <cat-toy>, café naïve!!", "rock'n'roll don't",
           "  extra   spaces\tand\nnewlines ", "x" * 300]


def tokenizer_copy(source, destination, keep):
    """destination: source's tokenizer files named in keep, plus its config files."""
    os.makedirs(destination, exist_ok=True)
    for name in keep + CONFIGS:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(destination, name))
    return str(destination)


def pipeline_with_tokenizer_files(pipeline, destination, keep, folders=("tokenizer",)):
    """A copy of pipeline whose tokenizer folder(s) hold only the files named in keep (and their configs)."""
    shutil.copytree(pipeline, destination)
    for folder in folders:
        shutil.rmtree(os.path.join(destination, folder))
        tokenizer_copy(os.path.join(pipeline, folder), os.path.join(destination, folder), keep)
    return str(destination)


def test_both_layouts_give_the_same_token_ids(tiny_pipeline, tmp_path):
    vocab = tokenizer_copy(os.path.join(tiny_pipeline, "tokenizer"), tmp_path / "vocab", VOCAB_LAYOUT)
    single = tokenizer_copy(os.path.join(tiny_pipeline, "tokenizer"), tmp_path / "json", JSON_LAYOUT)
    assert (tokenizer_layout(vocab), tokenizer_layout(single)) == ("vocab", "tokenizer.json")
    a, b = load_clip_tokenizer(vocab), load_clip_tokenizer(single)
    assert len(a) == len(b) == 49408
    for prompt in PROMPTS:
        assert a(prompt, padding="max_length", truncation=True, max_length=77).input_ids == \
            b(prompt, padding="max_length", truncation=True, max_length=77).input_ids, prompt
    assert add_placeholder_tokens(a, "<cat-toy>", 3, "toy") == add_placeholder_tokens(b, "<cat-toy>", 3, "toy") \
        == ([49408, 49409, 49410], [5988])


def test_sdxl_second_tokenizer_keeps_its_pad_token(tiny_sdxl_pipeline, tmp_path):
    """SDXL's tokenizer_2 pads with "!" (id 0), not <|endoftext|>: read from tokenizer.json alone as well."""
    single = tokenizer_copy(os.path.join(tiny_sdxl_pipeline, "tokenizer_2"), tmp_path / "json2", JSON_LAYOUT)
    tokenizer = load_clip_tokenizer(single)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("!", 0)
    assert tokenizer("a toy", padding="max_length", max_length=8).input_ids == [49406, 320, 5988, 49407, 0, 0, 0, 0]


@pytest.mark.parametrize("keep, missing", [((), "missing vocab.json and merges.txt"),
                                           (("vocab.json",), "missing merges.txt")])
def test_neither_layout_is_one_line_naming_the_missing_files(tiny_pipeline, tmp_path, keep, missing):
    folder = tokenizer_copy(os.path.join(tiny_pipeline, "tokenizer"), tmp_path / "tokenizer", keep)
    with pytest.raises(UserError) as info:
        load_clip_tokenizer(folder)
    message = str(info.value)
    assert "\n" not in message
    assert folder in message and missing in message and "tokenizer.json" in message, message


def test_missing_tokenizer_folder_is_named(tiny_pipeline, tmp_path):
    model = pipeline_with_tokenizer_files(tiny_pipeline, tmp_path / "model", ())
    shutil.rmtree(os.path.join(model, "tokenizer"))
    with pytest.raises(UserError, match="tokenizer' does not exist"):
        load_clip_tokenizer(model, subfolder="tokenizer")


def test_trainer_gives_the_same_vectors_from_tokenizer_json_alone(tiny_pipeline, train_images, tmp_path):
    """A pipeline saved by transformers 5 (tokenizer.json only) trains to the vectors of the vocab.json layout."""
    single = pipeline_with_tokenizer_files(tiny_pipeline, tmp_path / "json-only", JSON_LAYOUT)
    vocab = pipeline_with_tokenizer_files(tiny_pipeline, tmp_path / "vocab-only", VOCAB_LAYOUT)
    learned = []
    for model in (single, vocab):
        out = str(tmp_path / f"out-{os.path.basename(model)}")
        run_script(base_args(model, train_images, out, max_train_steps=2), check=True)
        learned.append(read_vectors(os.path.join(out, "learned_embeds.safetensors")))
    np.testing.assert_array_equal(learned[0], learned[1])


def test_trainer_refuses_a_tokenizer_folder_with_neither_layout(tiny_pipeline, train_images, tmp_path):
    model = pipeline_with_tokenizer_files(tiny_pipeline, tmp_path / "model", ("vocab.json",))
    result = run_script(base_args(model, train_images, str(tmp_path / "out")))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("textual_inversion.py: error: no tokenizer in "), line
    assert os.path.join(model, "tokenizer") in line and "missing merges.txt" in line, line
