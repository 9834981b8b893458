"""Proof that textual_inversion.py learns a concept, end to end, offline on CPU.

tests/assets/shapes-sd is a small text-to-image pipeline pretrained (tools/pretrain_shapes_model.py)
on coloured shapes with two pairs never shown; one of them, purple star (tools/shapes.DEV_CONCEPT),
is what recipes and thresholds are developed on. `make demo` (tools/demo.py) is run as users run it:
it trains a new token initialised from "shape" on five images of purple stars with textual_inversion.py
and the documented recipe (tools/shapes.RECIPE), then measures the saved embeddings loaded by
diffusers' load_textual_inversion. Then:
  1. the denoising loss on fresh purple stars is lower with "a photo of a <token>" than with
     "a photo of a shape" (same images, noise and timesteps: a paired comparison);
  2. samples generated from the token are judged purple stars far more often than from "shape";
  3. the vector written into the embedding table by hand gives the same loss as the loader.
A negative control (the same run with a learning rate too small to move the vector) must fail the
same checks, so the test can fail. Thresholds (tools/shapes.py) were set from several seeds; see
README "Proof that it learns". tests/flax/test_flax_learning.py makes the same claims for the Flax trainer.
"""

import contextlib
import os

import pytest

from conftest import REPO, base_args, run_script

ASSET = os.path.join(REPO, "tests", "assets", "shapes-sd")
TOKEN = "<my-shape>"
TRAIN_STEPS = 200
TRAINER_SEED = 1234
BROKEN_LEARNING_RATE = 1e-9  # a valid flag value under which the vector cannot move measurably


def train(tmp_path, asset=ASSET, recipe=None, **overrides):
    """textual_inversion.py on five images of DEV_CONCEPT with the recipe (default shapes.RECIPE) plus overrides;
    returns the saved learned_embeds.safetensors."""
    from tools import shapes

    data = shapes.write_concept_images(tmp_path / "images", shapes.DEV_CONCEPT)
    out = str(tmp_path / "out")
    options = dict(recipe or shapes.RECIPE, placeholder_token=TOKEN, max_train_steps=TRAIN_STEPS, seed=TRAINER_SEED,
                   export_formats="diffusers")
    options.update(overrides)
    # One thread: these kernels are tiny, and it is the configuration the thresholds were measured in.
    result = run_script(base_args(asset, data, out, **options), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(out, "learned_embeds.safetensors")


@contextlib.contextmanager
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(embedding_file, asset=ASSET):
    from tools import shapes

    with one_torch_thread():
        numbers = shapes.measure_embeddings(asset, [embedding_file], TOKEN, shapes.DEV_CONCEPT)[embedding_file]
    print("measured:", numbers)
    return numbers


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo` (tools/demo.py) with the test's seed: it trains DEV_CONCEPT with the recipe for TRAIN_STEPS
    steps through textual_inversion.py's command line, measures the saved embeddings with diffusers'
    load_textual_inversion and writes learning.png and learning.json. The learning claims are read off its
    numbers, so the demo users run is the run the thresholds hold for."""
    import json
    import subprocess
    import sys

    out = str(tmp_path_factory.mktemp("demo") / "demo-output")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output_dir", out,
                           "--seed", str(TRAINER_SEED)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "learning.json")) as f:
        numbers = json.load(f)
    print("demo:", json.dumps(numbers))
    return out, numbers, proc.stdout


@pytest.fixture(scope="module")
def learned(demo):
    out, numbers, _ = demo
    final = numbers["token_after_steps"][str(TRAIN_STEPS)]
    return os.path.join(out, "learned_embeds.safetensors"), {
        "loss_token": final["loss"], "rate_token": final["rate"],
        "loss_initializer": numbers["initializer"]["loss"], "rate_initializer": numbers["initializer"]["rate"]}


def test_demo_writes_the_picture_the_files_and_a_loading_snippet(demo):
    from PIL import Image

    from tools import demo as demo_tool

    out, numbers, stdout = demo
    with Image.open(os.path.join(out, "learning.png")) as picture:
        assert picture.width > picture.height > 200
    assert [int(s) for s in numbers["token_after_steps"]] == list(demo_tool.SHOWN_STEPS)
    for step in demo_tool.SHOWN_STEPS:
        assert os.path.isfile(os.path.join(out, f"learned_embeds-steps-{step}.safetensors"))
    for name in ("learned_embeds.bin", "token_identifier.txt", "my-shape.pt", "my-shape.safetensors", "loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "pipe.load_textual_inversion(" in stdout and "judged purple star" in stdout
    # The final embedding is the last column's: the run saved what the picture shows.
    assert filecmp_equal(os.path.join(out, "learned_embeds.safetensors"),
                         os.path.join(out, f"learned_embeds-steps-{TRAIN_STEPS}.safetensors"))


def filecmp_equal(a, b):
    from textual_inversion_core.embeddings import read_embedding

    (token_a, vectors_a), (token_b, vectors_b) = read_embedding(a), read_embedding(b)
    return token_a == token_b and (vectors_a == vectors_b).all()


def test_judge_reads_fresh_procedural_images():
    from tools import shapes

    assert shapes.judge_accuracy(count=600, seed=777) >= 0.98


def test_learned_token_lowers_the_concept_loss_and_generates_the_concept(learned):
    from tools import shapes

    _, numbers = learned
    assert shapes.learning_shortfalls(numbers) == []


def test_the_vector_written_in_by_hand_gives_the_loaders_loss(learned):
    """What load_textual_inversion measured is the file's vector in the token's row, nothing more."""
    import torch

    from textual_inversion_core.embeddings import read_embedding
    from tools import shapes

    embedding_file, numbers = learned
    token, vectors = read_embedding(embedding_file)
    assert token == TOKEN and vectors.shape[0] == 1
    with one_torch_thread():
        pipe = shapes.load_pipeline(ASSET)
        pipe.tokenizer.add_tokens([TOKEN])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        with torch.no_grad():
            row = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
            pipe.text_encoder.get_input_embeddings().weight[row] = torch.from_numpy(vectors[0])
        loss = shapes.concept_loss(pipe, f"a photo of a {TOKEN}", shapes.DEV_CONCEPT)
    assert abs(loss - numbers["loss_token"]) < 1e-5


def test_negative_control_a_trainer_that_does_not_move_the_vector_fails(tmp_path):
    from tools import shapes

    shortfalls = shapes.learning_shortfalls(measure(train(tmp_path, learning_rate=BROKEN_LEARNING_RATE)))
    # The loss and the judged-rate claims both fail, each on its own.
    assert any("loss" in s for s in shortfalls) and any("more often" in s for s in shortfalls), shortfalls
