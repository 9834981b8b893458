"""Proof that textual_inversion_flax.py learns a concept: the claims and thresholds of tests/test_learning.py.

The Flax trainer is run as users run it, with the same recipe, images, token and step count as the
PyTorch test, on one CPU thread. Its embedding file is then measured in the PyTorch environment
(.venv) by the same code (`tools/shapes.py measure`: diffusers' load_textual_inversion, the paired
concept loss, 48 judged samples), so both trainers are held to one measurement, and the file is
shown to work where users load it.
"""

import json
import os

import pytest

from helpers import FLAX_SCRIPT, REPO, TORCH_PYTHON, flax_base_args, run_script

ASSET = os.path.join(REPO, "tests", "assets", "shapes-sd")
TOKEN = "<my-shape>"
TRAIN_STEPS = 200  # as tests/test_learning.py
TRAINER_SEED = 1234


def one_thread_jax_env(cache):
    """One XLA CPU thread (the thresholds' configuration) and the session's compilation cache."""
    return {"JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                         "intra_op_parallelism_threads=1"}


def measure_in_torch_env(embedding_file, concept):
    import subprocess

    proc = subprocess.run([TORCH_PYTHON, os.path.join(REPO, "tools", "shapes.py"), "measure", "--pipeline", ASSET,
                           "--token", TOKEN, "--concept", " ".join(concept), embedding_file],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])[embedding_file]


@pytest.fixture(scope="module")
def learned(compile_cache, tmp_path_factory):
    from tools import shapes

    root = tmp_path_factory.mktemp("flax-learning")
    data = shapes.write_concept_images(root / "images", shapes.DEV_CONCEPT)
    out = str(root / "out")
    options = dict(shapes.RECIPE, placeholder_token=TOKEN, max_train_steps=TRAIN_STEPS, seed=TRAINER_SEED,
                   num_vectors=1, export_formats="diffusers")
    proc = run_script(flax_base_args(ASSET, data, out, **options), FLAX_SCRIPT, env=one_thread_jax_env(compile_cache),
                      timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    embedding_file = os.path.join(out, "learned_embeds.safetensors")
    numbers = measure_in_torch_env(embedding_file, shapes.DEV_CONCEPT)
    print("measured:", numbers)
    return numbers


def test_flax_learned_token_lowers_the_concept_loss_and_generates_the_concept(learned):
    from tools import shapes

    assert shapes.learning_shortfalls(learned) == []
