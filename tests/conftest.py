"""Shared fixtures: an offline tiny Stable Diffusion pipeline, training images, and a script runner."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TRAIN_SCRIPT = os.path.join(REPO, "textual_inversion.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (fault injection, multi-process); still run by make test")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A random-weight tiny SD pipeline folder with the real CLIP vocabulary (built once per session)."""
    from tools.make_tiny_pipeline import make_pipeline

    return make_pipeline(str(tmp_path_factory.mktemp("pipelines") / "tiny"), size="tiny", seed=0)


def write_images(folder, count=4, size=(80, 96), seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        # Smooth colour blobs, not pure noise, so the VAE sees image-like statistics.
        y, x = np.mgrid[0 : size[0], 0 : size[1]]
        cx, cy = rng.uniform(0, size[1]), rng.uniform(0, size[0])
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (size[0] / 4) ** 2))
        colour = rng.uniform(0, 255, 3)
        image = (blob[..., None] * colour + (1 - blob[..., None]) * 255 * rng.uniform(0, 1, 3)).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"image_{i}.png"))
    return str(folder)


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "images")


def base_args(pipeline, data_dir, output_dir, **overrides):
    """A fast command line for the tiny pipeline; overrides use flag names without dashes (None drops a flag)."""
    options = {
        "pretrained_model_name_or_path": pipeline, "train_data_dir": data_dir, "output_dir": output_dir,
        "placeholder_token": "<cat-toy>", "initializer_token": "toy", "resolution": 64,
        "train_batch_size": 2, "max_train_steps": 6, "learning_rate": 5e-3, "lr_warmup_steps": 0,
        "seed": 1234, "report_to": "none", "checkpointing_steps": 0, "save_steps": 0,
    }
    options.update(overrides)
    argv = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}" if value is True else f"--{key}={value}")
    return argv


def run_script(argv, script=TRAIN_SCRIPT, env=None, timeout=600, launcher=None):
    """Run a trainer as users do (a subprocess); returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    full_env.update(env or {})
    command = (launcher or [sys.executable]) + [script] + list(argv)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
