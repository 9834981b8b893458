"""The framework-free core: imports without torch/jax, schedules equal diffusers', data order is exact."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, write_images
from textual_inversion_core import checkpoints
from textual_inversion_core.cli import flag_names
from textual_inversion_core.data import OBJECT_TEMPLATES, STYLE_TEMPLATES, TextualInversionDataset
from textual_inversion_core.schedules import LR_SCHEDULERS, lr_multiplier


def test_core_imports_without_torch_or_jax():
    code = ("import sys\n"
            "for name in ('torch', 'jax', 'flax', 'tensorflow'): sys.modules[name] = None\n"
            "import textual_inversion_core, textual_inversion_core.cli, textual_inversion_core.data, "
            "textual_inversion_core.embeddings, textual_inversion_core.checkpoints, textual_inversion_core.hub, "
            "textual_inversion_core.schedules, textual_inversion_core.atomic\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_lr_schedules_match_diffusers(name):
    import torch
    from diffusers.optimization import get_scheduler

    base_lr, warmup, total, cycles = 5e-4, 10, 60, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles)
    for step in range(total):
        expected = optimizer.param_groups[0]["lr"]
        ours = base_lr * lr_multiplier(name, step, warmup, total, cycles, base_lr)
        assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15), (name, step)
        optimizer.step()
        scheduler.step()


def test_templates():
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_example_order_is_a_pure_function_of_seed_and_index(tmp_path):
    data = write_images(tmp_path / "d", count=3)
    a = TextualInversionDataset(data, size=32, repeats=4, seed=5)
    b = TextualInversionDataset(data, size=32, repeats=4, seed=5)
    order_a = [a.example(i) for i in range(40)]
    assert [b.example(i) for i in reversed(range(40))] == list(reversed(order_a))  # no hidden state
    # Each epoch (12 examples) shows every image exactly `repeats` times.
    for epoch in range(3):
        images = [order_a[epoch * 12 + i][0] for i in range(12)]
        assert sorted(images) == sorted([0, 1, 2] * 4)
    flips = [f for _, f, _ in order_a]
    assert 0 < sum(flips) < len(flips)
    assert order_a != [TextualInversionDataset(data, size=32, repeats=4, seed=6).example(i) for i in range(40)]


def test_pixels_are_scaled_and_flipped(tmp_path):
    data = write_images(tmp_path / "d", count=1, size=(40, 40))
    ds = TextualInversionDataset(data, size=32, repeats=1)
    plain, flipped = ds.pixels(0, False), ds.pixels(0, True)
    assert plain.shape == (3, 32, 32) and plain.dtype == np.float32
    assert -1.0 <= plain.min() and plain.max() <= 1.0
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_every_prompt_holds_every_placeholder_token(tmp_path, tiny_pipeline):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tiny_pipeline, "tokenizer"))
    tokens = ["<t>", "<t>_1", "<t>_2"]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    ds = TextualInversionDataset(write_images(tmp_path / "d", count=1), tokenizer, " ".join(tokens), size=32)
    for row in ds.all_prompt_ids:
        assert all(i in row for i in ids)
    assert ds[0]["input_ids"].shape == (77,)


def test_checkpoint_rotation_and_latest(tmp_path):
    out = str(tmp_path)
    for step in (5, 10, 15, 20):
        checkpoints.save_checkpoint(out, step, {"vectors": np.full((1, 4), step, np.float32)}, {"seed": 1}, total_limit=3)
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [10, 15, 20]
    os.makedirs(os.path.join(out, ".tmp-checkpoint-25-abc"))  # an interrupted save is never picked
    latest = checkpoints.resolve_checkpoint(out, "latest")
    tensors, state = checkpoints.load_checkpoint(latest)
    assert state["step"] == 20 and tensors["vectors"][0, 0] == 20


def test_readme_multi_process_commands_really_start_several_processes():
    """Without --multi_gpu (or a config file) `accelerate launch --num_processes N` starts N processes only on a
    machine with several GPUs; on CPU it silently runs one (tests/test_multiprocess.py launches the form shown)."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    commands = [c for c in re.findall(r"accelerate launch[^`\n]*", readme) if "--num_processes" in c]
    assert commands
    for command in commands:
        processes = re.search(r"--num_processes[ =](\S+)", command).group(1)
        if processes != "1":
            assert "--multi_gpu" in command or "--config_file" in command, command


def test_readme_documents_every_flag_and_the_newcomer_commands():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    missing = [f for f in flag_names() if f"`{f}`" not in readme]
    assert not missing, missing
    assert "make demo" in readme and "make test" in readme
    for name in ("learned_embeds.bin", "learned_embeds.safetensors", "token_identifier.txt", "type_of_concept.txt"):
        assert name in readme
