"""Captions, prompt-template files and what the data folder holds (textual_inversion_core/data.py),
then end to end in the PyTorch trainer: a captioned folder trains, and 2 processes equal 1."""

import os
import sys
import warnings

import numpy as np
import pytest

from helpers import REPO, base_args, read_vectors, run_in_process, run_script, write_images
from textual_inversion_core.data import OBJECT_TEMPLATES, TextualInversionDataset
from textual_inversion_core.errors import UserError

TOKENIZER = os.path.join(REPO, "tests", "assets", "shapes-sd", "tokenizer")  # the real CLIP vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    tok.add_tokens(["<t>", "<t>_1"])
    return tok


def build(folder, tokenizer=None, placeholder="<t>", **options):
    """A small dataset, its warnings recorded: (dataset, [warning messages])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = TextualInversionDataset(folder, size=32, repeats=3, seed=11, placeholder_token="<t>", **options)
        if tokenizer is not None:
            dataset.tokenize(tokenizer, placeholder)
    return dataset, [str(w.message) for w in caught]


def write(path, text, encoding="utf-8"):
    with open(path, "w", encoding=encoding) as f:
        f.write(text)


def prompts_of(dataset, image_index):
    """Every prompt the image can be trained with, in template order."""
    return [dataset.prompts[row] for row in dataset._row_of[image_index]]


@pytest.fixture
def captioned(tmp_path):
    """Four images: a caption, a caption with the token, an empty caption file, no caption file."""
    folder = write_images(tmp_path / "data", count=4)
    write(os.path.join(folder, "image_0.txt"), "a red ball\non  green grass\n")
    write(os.path.join(folder, "image_1.txt"), "<t> asleep on a sofa, <t> again")
    write(os.path.join(folder, "image_2.txt"), "  \n")
    return folder


# ---- Captions ------------------------------------------------------------------------------------------------

def test_sidecar_captions_and_the_prompts_they_give(captioned, tokenizer):
    dataset, messages = build(captioned, tokenizer, "<t> <t>_1", caption_extension=".txt")
    assert dataset.captions == ["a red ball on green grass", "<t> asleep on a sofa, <t> again", "", ""]
    expanded = [t.format("<t> <t>_1") for t in OBJECT_TEMPLATES]
    # No token in the caption: the built-in template, then the caption.
    assert prompts_of(dataset, 0) == [p + ", a red ball on green grass" for p in expanded]
    # The token in the caption: the caption is the prompt as is, every mention expanded to all vectors.
    assert set(prompts_of(dataset, 1)) == {"<t> <t>_1 asleep on a sofa, <t> <t>_1 again"}
    # Empty caption file and no caption file: the template alone, i.e. diffusers' prompts.
    assert prompts_of(dataset, 2) == prompts_of(dataset, 3) == expanded
    assert len(dataset.prompts) == len(set(dataset.prompts)) == 2 * 27 + 1  # each distinct prompt tokenised once
    assert dataset.all_prompt_ids.shape == (55, 77) and dataset.all_prompt_ids.dtype == np.int64
    missing = [m for m in messages if "no .txt caption file" in m]
    empty = [m for m in messages if "are empty" in m]
    assert len(missing) == 1 and "1 of 4 images" in missing[0] and "image_3.png" in missing[0]
    assert len(empty) == 1 and "image_2.txt" in empty[0] and "template alone" in empty[0]
    assert not any("non-image" in m for m in messages)  # the caption files are not "skipped files"


def test_captions_keep_the_keyed_image_flip_and_template_draws(captioned, tokenizer):
    plain, _ = build(captioned, tokenizer)
    captioned_set, _ = build(captioned, tokenizer, caption_extension="txt")  # "txt" means ".txt"
    captions = captioned_set.captions
    for index in range(400):
        image, flipped, row = captioned_set.example(index)
        plain_image, plain_flipped, template = plain.example(index)
        assert (image, flipped) == (plain_image, plain_flipped)
        template_prompt = plain.prompts[template]
        caption = captions[image]
        expected = caption if "<t>" in caption else (f"{template_prompt}, {caption}" if caption else template_prompt)
        assert captioned_set.prompts[row] == expected, index
        np.testing.assert_array_equal(captioned_set[index]["input_ids"], captioned_set.all_prompt_ids[row])


def test_a_token_inside_another_word_is_not_the_token(tmp_path, tokenizer):
    folder = write_images(tmp_path / "data", count=1)
    write(os.path.join(folder, "image_0.txt"), "tasks, masks and sksx marks")
    dataset = TextualInversionDataset(folder, size=32, placeholder_token="sks", caption_extension=".txt")
    dataset.tokenize(tokenizer, "sks")
    assert dataset.prompts[0] == "a photo of a sks, tasks, masks and sksx marks"
    write(os.path.join(folder, "image_0.txt"), "sks on a table")
    dataset = TextualInversionDataset(folder, size=32, placeholder_token="sks", caption_extension=".txt")
    dataset.tokenize(tokenizer, "sks")
    assert dataset.prompts == ["sks on a table"]


def test_no_caption_file_for_any_image_is_an_error(tmp_path):
    folder = write_images(tmp_path / "data", count=2)
    write(os.path.join(folder, "image_0.caption"), "a ball")
    with pytest.raises(UserError, match=r"--caption_extension \.txt: none of the 2 images has a caption file "
                                        r"\(looked for image_0\.txt"):
        build(folder, caption_extension=".txt")
    with pytest.raises(UserError, match="is an image extension"):
        build(folder, caption_extension=".png")


def test_caption_file_that_is_not_utf8_is_an_error(tmp_path):
    folder = write_images(tmp_path / "data", count=1)
    with open(os.path.join(folder, "image_0.txt"), "wb") as f:
        f.write(b"caf\xe9 au lait")
    with pytest.raises(UserError, match="image_0.txt' is not UTF-8 text"):
        build(folder, caption_extension=".txt")


def test_captions_from_file_names(tmp_path, tokenizer):
    folder = str(tmp_path / "data")
    write_images(folder, count=3)
    os.rename(os.path.join(folder, "image_0.png"), os.path.join(folder, "00012-red_car at night.png"))
    os.rename(os.path.join(folder, "image_1.png"), os.path.join(folder, "007.png"))
    dataset, messages = build(folder, tokenizer, caption_from_filename=True)
    by_name = dict(zip((os.path.basename(p) for p in dataset.image_paths), dataset.captions))
    assert by_name == {"00012-red_car at night.png": "red car at night", "007.png": "", "image_2.png": "image 2"}
    assert sum("give no caption" in m and "007.png" in m for m in messages) == 1
    # With a sidecar extension too, the caption file wins and the file name covers the rest, silently.
    write(os.path.join(folder, "image_2.txt"), "a green cube")
    dataset, messages = build(folder, tokenizer, caption_extension=".txt", caption_from_filename=True)
    by_name = dict(zip((os.path.basename(p) for p in dataset.image_paths), dataset.captions))
    assert by_name["image_2.png"] == "a green cube" and by_name["00012-red_car at night.png"] == "red car at night"
    assert not any("caption file and are trained" in m for m in messages)


def test_long_captions_are_cut_with_one_warning(tmp_path, tokenizer):
    folder = write_images(tmp_path / "data", count=3)
    for i in range(2):
        write(os.path.join(folder, f"image_{i}.txt"), " ".join(["word"] * 90))
    dataset, messages = build(folder, tokenizer, caption_extension=".txt")
    cut = [m for m in messages if "longer than the tokenizer's 77 tokens" in m]
    assert len(cut) == 1 and "image_0.png, image_1.png" in cut[0] and "image_2.png" not in cut[0]
    assert dataset.all_prompt_ids.shape[1] == 77
    token_id = tokenizer.convert_tokens_to_ids("<t>")
    assert all(token_id in row for row in dataset.all_prompt_ids)
    # A caption used as is whose token comes after the cut would train nothing: an error, not a warning.
    write(os.path.join(folder, "image_0.txt"), " ".join(["word"] * 90) + " <t>")
    with pytest.raises(UserError, match=r"the prompt of image_0\.png is longer than 77 tokens .* keeps none of <t>"):
        build(folder, tokenizer, caption_extension=".txt")


def test_a_prompt_of_exactly_the_limit_is_not_cut(tmp_path, tokenizer):
    folder = write_images(tmp_path / "data", count=2)
    templates = tmp_path / "t.txt"
    write(templates, "{token} {caption}\n")
    write(os.path.join(folder, "image_0.txt"), " ".join(["word"] * 74))  # start + <t> + 74 + end = 77 tokens
    write(os.path.join(folder, "image_1.txt"), " ".join(["word"] * 75))
    dataset, messages = build(folder, tokenizer, caption_extension=".txt", prompt_template_file=str(templates))
    cut = [m for m in messages if "longer than" in m]
    assert len(cut) == 1 and "1 prompt(s)" in cut[0] and "(longest 78)" in cut[0] and "image_1.png" in cut[0]
    assert "image_0.png" not in cut[0]
    assert dataset.all_prompt_ids[dataset._row_of[0, 0], -1] == tokenizer.eos_token_id


# ---- Prompt-template files -----------------------------------------------------------------------------------

def test_template_file_placeholders_in_both_spellings(captioned, tokenizer, tmp_path):
    ours, a1111 = tmp_path / "ours.txt", tmp_path / "a1111.txt"
    write(ours, "# my templates\n{token} photographed, {caption}\n\n  a {caption} drawing of {token}  \n")
    write(a1111, "[name] photographed, [filewords]\na [filewords] drawing of [name]\n")
    first, _ = build(captioned, tokenizer, caption_extension=".txt", prompt_template_file=str(ours))
    second, _ = build(captioned, tokenizer, caption_extension=".txt", prompt_template_file=str(a1111))
    assert len(first.templates) == 2  # the comment and the blank line are not templates
    assert prompts_of(first, 0) == ["<t> photographed, a red ball on green grass",
                                    "a a red ball on green grass drawing of <t>"]
    assert prompts_of(first, 1) == ["<t> asleep on a sofa, <t> again"] * 2
    assert prompts_of(first, 3) == ["<t> photographed", "a drawing of <t>"]  # separators of the empty caption go
    assert first.prompts == second.prompts
    assert [first.example(i) for i in range(100)] == [second.example(i) for i in range(100)]
    assert {first.example(i)[2] for i in range(100) if first.example(i)[0] == 0} == set(first._row_of[0])


def test_template_file_without_captions_uses_the_token_only(tmp_path, tokenizer):
    folder = write_images(tmp_path / "data", count=2)
    templates = tmp_path / "t.txt"
    write(templates, "a photo of {token}\na sketch of {token} {token}\n")
    dataset, messages = build(folder, tokenizer, "<t> <t>_1", prompt_template_file=str(templates))
    assert dataset.prompts == ["a photo of <t> <t>_1", "a sketch of <t> <t>_1 <t> <t>_1"]
    assert {dataset.example(i)[2] for i in range(60)} == {0, 1}
    assert not messages


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("# nothing here\n\n", "holds no template"),
    ("a photo of {token}\na photo of {}\n", r"line 2 of --prompt_template_file .* has no \{token\} \(or \[name\]\) "
                                          r"placeholder \(write \{token\} where diffusers' lists have \{\}\)"),
    ("a photo of {token}, {caption}\n", r"uses \{caption\} \(or \[filewords\]\) but no captions are read"),
    (b"a \xff photo of {token}\n", "is not UTF-8 text"),
], ids=["missing file", "no template", "line without the token", "caption placeholder without captions", "not UTF-8"])
def test_template_file_mistakes_are_one_line_errors(tmp_path, content, expected):
    folder = write_images(tmp_path / "data", count=1)
    path = tmp_path / "templates.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        write(path, content)
    with pytest.raises(UserError, match=expected) as err:
        build(folder, prompt_template_file=str(path))
    assert "\n" not in str(err.value)


def test_an_empty_caption_takes_its_separators_along(tmp_path, tokenizer):
    folder = write_images(tmp_path / "data", count=2)
    write(os.path.join(folder, "image_0.txt"), "on a shelf")
    write(os.path.join(folder, "image_1.txt"), "")
    templates = tmp_path / "t.txt"
    write(templates, "{token}, {caption}, high quality\n{caption}, {token}\nthe {token} , {caption}\n")
    dataset, _ = build(folder, tokenizer, caption_extension=".txt", prompt_template_file=str(templates))
    assert prompts_of(dataset, 0) == ["<t>, on a shelf, high quality", "on a shelf, <t>", "the <t> , on a shelf"]
    assert prompts_of(dataset, 1) == ["<t>, high quality", "<t>", "the <t>"]


def test_template_file_without_caption_placeholder_warns_that_captions_go_unused(captioned, tmp_path, tokenizer):
    templates = tmp_path / "t.txt"
    write(templates, "a photo of {token}\n")
    dataset, messages = build(captioned, tokenizer, caption_extension=".txt", prompt_template_file=str(templates))
    unused = [m for m in messages if "are not used" in m]
    assert len(unused) == 1 and "1 image(s)" in unused[0] and "image_0.png" in unused[0]
    assert prompts_of(dataset, 0) == ["a photo of <t>"] and prompts_of(dataset, 1) == ["<t> asleep on a sofa, <t> again"]


# ---- What the folder holds -----------------------------------------------------------------------------------

def test_subfolder_images_are_named_or_followed(tmp_path, tokenizer):
    folder = write_images(tmp_path / "data", count=2)
    write_images(os.path.join(folder, "more"), count=2)
    write(os.path.join(folder, "more", "image_1.txt"), "a cube")
    write_images(os.path.join(folder, "more", "deeper"), count=1)
    write_images(os.path.join(folder, ".ipynb_checkpoints"), count=3)  # hidden: never trained, never counted
    output_dir = os.path.join(folder, "text-inversion-model")
    write_images(os.path.join(output_dir, "validation"), count=2)  # the run's own output folder

    dataset, messages = build(folder, exclude_dirs=[output_dir])
    assert [os.path.relpath(p, folder) for p in dataset.image_paths] == ["image_0.png", "image_1.png"]
    left_out = [m for m in messages if "left out" in m]
    assert len(left_out) == 1 and "left out 3 image(s)" in left_out[0] and f"more{os.sep} (3)" in left_out[0]
    assert "--recursive" in left_out[0]

    dataset, messages = build(folder, tokenizer, recursive=True, caption_extension=".txt", exclude_dirs=[output_dir])
    assert [os.path.relpath(p, folder) for p in dataset.image_paths] == [
        "image_0.png", "image_1.png", os.path.join("more", "image_0.png"), os.path.join("more", "image_1.png"),
        os.path.join("more", "deeper", "image_0.png")]
    assert dataset.captions[3] == "a cube" and not any("left out" in m for m in messages)
    assert sorted({dataset.example(i)[0] for i in range(15)}) == [0, 1, 2, 3, 4]


def test_images_only_in_subfolders_point_at_recursive(tmp_path):
    folder = str(tmp_path / "data")
    write_images(os.path.join(folder, "cats"), count=2)
    with pytest.raises(UserError, match=r"contains no image files \(its 2 image\(s\) are in subfolders: pass --recursive\)"):
        build(folder)


def test_much_smaller_images_are_named_with_their_upscale_factor(tmp_path):
    from PIL import Image

    folder = write_images(tmp_path / "data", count=1)  # 96x80: 1.6x at 128, not named
    Image.new("RGB", (1, 1), (200, 10, 10)).save(os.path.join(folder, "dot.png"))
    Image.new("RGB", (32, 32), (10, 200, 10)).save(os.path.join(folder, "icon.png"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TextualInversionDataset(folder, size=128)
    small = [str(w.message) for w in caught if "much smaller than --resolution 128" in str(w.message)]
    assert len(small) == 1 and "dot.png (1x1, 128x)" in small[0] and "icon.png (32x32, 4x)" in small[0]
    assert "image_0.png" not in small[0]


def test_caption_files_left_unused_get_a_hint(captioned):
    _, messages = build(captioned)
    skipped = [m for m in messages if "non-image file" in m]
    assert len(skipped) == 1 and "caption files? pass --caption_extension .txt" in skipped[0]


def test_only_the_first_process_reports(captioned, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    _, messages = build(captioned, caption_extension=".txt")
    assert messages == []
    monkeypatch.setenv("RANK", "0")
    _, messages = build(captioned, caption_extension=".txt")
    assert messages


# ---- End to end: the PyTorch trainer -------------------------------------------------------------------------

def captioned_run_folder(root):
    folder = write_images(root, count=4)
    write(os.path.join(folder, "image_0.txt"), "a toy on green grass")
    write(os.path.join(folder, "image_1.txt"), "<cat-toy> asleep on a red sofa")
    write(os.path.join(folder, "image_2.txt"), "a toy in the snow, seen from above")
    return folder  # image_3.png has no caption file


@pytest.mark.slow
def test_captioned_folder_trains_and_two_processes_equal_one(tiny_pipeline, tmp_path):
    data = captioned_run_folder(tmp_path / "data")
    settings = dict(max_train_steps=3, num_vectors=2, caption_extension=".txt")
    single = str(tmp_path / "single")
    one = run_in_process(base_args(tiny_pipeline, data, single, train_batch_size=2, **settings))
    assert one.returncode == 0, one.stderr[-3000:]
    double = str(tmp_path / "double")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = run_script(base_args(tiny_pipeline, data, double, train_batch_size=1, **settings), launcher=torchrun,
                     env={"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-5000:]
    assert "processes = 2" in two.stderr
    for result in (one, two):  # the documented behaviour for the missing caption, said once, not once per rank
        warned = [line for line in result.stderr.splitlines() if "have no .txt caption file" in line]
        assert len(warned) == 1 and "image_3.png" in warned[0] and "warning:" in warned[0], result.stderr[-3000:]
    a, b = (read_vectors(os.path.join(d, "learned_embeds.safetensors")) for d in (single, double))
    assert a.shape == (2, 32)
    assert float(np.abs(a - b).max()) <= 1e-6  # the gradient all-reduce's summation order, as in test_multiprocess


@pytest.mark.slow
def test_caption_with_the_token_trains_exactly_as_that_prompt(tiny_pipeline, tmp_path):
    """Every image captioned "a photo of <cat-toy>" trains bit-identically to the one-line template "a photo of {token}",
    and differently from the built-in templates: captions and template files reach the trainer's prompts."""
    data = write_images(tmp_path / "data", count=2)
    for i in range(2):
        write(os.path.join(data, f"image_{i}.txt"), "a photo of <cat-toy>")
    templates = tmp_path / "one.txt"
    write(templates, "a photo of {token}\n")
    runs = {"captions": dict(caption_extension=".txt"), "template": dict(prompt_template_file=str(templates)),
            "builtin": {}}
    vectors = {}
    for name, flags in runs.items():
        out = str(tmp_path / name)
        result = run_in_process(base_args(tiny_pipeline, data, out, max_train_steps=2, **flags))
        assert result.returncode == 0, result.stderr[-3000:]
        vectors[name] = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    np.testing.assert_array_equal(vectors["captions"], vectors["template"])
    assert float(np.abs(vectors["captions"] - vectors["builtin"]).max()) > 1e-6


def test_template_without_token_is_one_line_from_the_trainer(tiny_pipeline, tmp_path, train_images):
    templates = tmp_path / "bad.txt"
    write(templates, "a photo of {token}\na photo of a toy\n")
    result = run_script(base_args(tiny_pipeline, train_images, str(tmp_path / "out"),
                                  prompt_template_file=str(templates)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("textual_inversion.py: error: line 2 of --prompt_template_file")
