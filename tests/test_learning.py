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

The demo's run also scores its 8 saved steps (validation loss on 5 other purple stars, reconstruction and
editability with the shapes CLIP) and keeps one by --select_best; with the judged rate of every saved step:
  4. the reconstruction score and the validation loss rank the saved steps as the judge does (Spearman);
  5. the step --select_best keeps is judged within a margin of the best saved step's rate.
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
# Spearman's rank correlation between a step score and the judged rate over a run's 8 saved steps (25, 50, ..., 200),
# measured by bench/step_scoring.py (bench/step_scoring.json, the demo's settings) on both held-out concepts x seeds
# 1, 2, 3: reconstruction +0.95, +0.68, +0.79 (purple star), +0.79, +0.90, +0.90 (green triangle), the weakest
# +0.68; validation loss (lower is better) +0.93, +0.87, +0.45 (purple star), +0.89, +0.78, +0.95 (green triangle),
# the weakest +0.45. The demo's seed measured +0.85 and +0.76 (step order alone: +0.52). The thresholds sit below the
# weakest seed; a score that orders the 8 steps at random passes them in 10 % and 16 % of orderings
# (MAX_CHANCE_OF_PASSING bounds that, so they stay thresholds that can fail).
MIN_RECONSTRUCTION_RANK = 0.5
MIN_VALIDATION_LOSS_RANK = 0.4
MAX_CHANCE_OF_PASSING = 0.2


def train(tmp_path, asset=ASSET, recipe=None, concept=None, **overrides):
    """textual_inversion.py on five images of concept (default DEV_CONCEPT) with the recipe (default shapes.RECIPE)
    plus overrides; returns the saved learned_embeds.safetensors."""
    from tools import shapes

    data = shapes.write_concept_images(tmp_path / "images", concept or shapes.DEV_CONCEPT)
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


def measure(embedding_file, asset=ASSET, concept=None):
    from tools import shapes

    with one_torch_thread():
        numbers = shapes.measure_embeddings(asset, [embedding_file], TOKEN, concept or shapes.DEV_CONCEPT)[embedding_file]
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
                           "--seed", str(TRAINER_SEED)], cwd=REPO, capture_output=True, text=True, timeout=1500,
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
    for name in ("learned_embeds.bin", "token_identifier.txt", "my-shape.pt", "my-shape.safetensors", "loss.png",
                 "eval.json", "eval.png", "learned_embeds-best.safetensors", "my-shape-best.pt"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "pipe.load_textual_inversion(" in stdout and "judged purple star" in stdout
    # The step scores under the picture's columns: a row per saved step (judged where the picture has it).
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines()
            if line.strip() and line.split()[0].isdigit() and len(line.split()) == 5}
    assert sorted(map(int, rows)) == list(range(25, TRAIN_STEPS + 1, 25)), stdout[-3000:]
    assert rows["100"][0] == f"{numbers['token_after_steps']['100']['rate']:.0%}" and rows["75"][0] == "–"
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


# --------------------------------------------------------------------------------------------------
# Which step is the good one? The demo run's step scores against the judge


def read_eval(out):
    import json

    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def judged_steps(demo):
    """{step: judged rate} of every saved step: the picture's columns from learning.json, the other saved steps
    judged here (the rate alone, from the same samples measure_embeddings judges)."""
    from tools import shapes

    out, numbers, _ = demo
    saved = sorted(int(s) for s, entry in read_eval(out)["steps"].items() if entry.get("embedding"))
    rates = {int(s): column["rate"] for s, column in numbers["token_after_steps"].items()}
    files = {os.path.join(out, f"learned_embeds-steps-{s}.safetensors"): s for s in saved if s not in rates}
    with one_torch_thread():
        rates.update({files[f]: rate for f, rate in shapes.judged_rates(ASSET, list(files), TOKEN,
                                                                        shapes.DEV_CONCEPT).items()})
    print("judged:", rates)
    assert sorted(rates) == saved and len(saved) == 8
    return {s: rates[s] for s in saved}


def chance_of_passing(values, rates, threshold):
    """The fraction of all orderings of values over the steps (8! of them) whose Spearman with rates reaches
    threshold: how often a score unrelated to the judge would pass."""
    import itertools

    import numpy as np

    from bench.step_scoring import ranks

    target = ranks(rates) - ranks(rates).mean()
    shuffled = ranks(values)[np.array(list(itertools.permutations(range(len(values)))))]
    shuffled -= shuffled.mean(axis=1, keepdims=True)
    rho = shuffled @ target / np.sqrt((shuffled ** 2).sum(axis=1) * (target ** 2).sum())
    return float(np.mean(rho >= threshold))


def test_step_scores_rank_the_saved_steps_as_the_judge_does(demo, judged_steps):
    from bench.step_scoring import spearman

    out, _, _ = demo
    entries = read_eval(out)["steps"]
    steps = list(judged_steps)
    rates = [judged_steps[s] for s in steps]
    scores = {"reconstruction": ([entries[str(s)]["reconstruction"] for s in steps], MIN_RECONSTRUCTION_RANK),
              "validation loss": ([-entries[str(s)]["validation_loss"] for s in steps], MIN_VALIDATION_LOSS_RANK)}
    for name, (values, threshold) in scores.items():
        rho = spearman(values, rates)
        print(f"{name}: Spearman {rho:+.2f} against the judged rate over steps {steps}")
        assert rho >= threshold, (name, rho, values, rates)
        # The check can fail: the reversed ordering fails it, and so do most orderings unrelated to the judge.
        assert spearman([-v for v in values], rates) < threshold
        assert chance_of_passing(values, rates, threshold) <= MAX_CHANCE_OF_PASSING


def test_select_best_keeps_a_step_judged_near_the_best_one(demo, judged_steps):
    """The demo keeps the step of `--select_best balanced`; the reconstruction rule's pick (the same code, over the
    same eval.json) too: each within bench/step_scoring.PICK_MARGIN of the best saved step's judged rate (6 of 6
    runs of the bench for both; validation_loss 5 of 6, so it is printed, not asserted)."""
    from bench.step_scoring import PICK_MARGIN
    from textual_inversion_core import best
    from tools import demo as demo_tool

    out, _, stdout = demo
    record = read_eval(out)
    top = max(judged_steps.values())
    assert record["best"]["rule"] == demo_tool.SELECT_BEST
    kept = record["best"]["step"]
    assert f"best step       {kept}   (--select_best {demo_tool.SELECT_BEST}" in stdout
    entries = {int(k): v for k, v in record["steps"].items()}
    picks = {rule: best.choose(entries, rule, record.get("initializer"))[0] for rule in best.RULES}
    print("picks:", picks, "judged:", judged_steps)
    assert picks[demo_tool.SELECT_BEST] == kept
    for rule in (demo_tool.SELECT_BEST, "reconstruction"):
        assert top - judged_steps[picks[rule]] <= PICK_MARGIN + 1e-9, (rule, picks[rule], judged_steps)
    # The check can fail: the earliest saved steps are judged far below the best.
    assert top - judged_steps[min(judged_steps)] > PICK_MARGIN
    assert filecmp_equal(os.path.join(out, "learned_embeds-best.safetensors"),
                         os.path.join(out, f"learned_embeds-steps-{kept}.safetensors"))
