"""Fixtures of the Flax tests (run in .venv-flax): a tiny pipeline, training images, an XLA cache.
Helpers shared by the test modules live in flax_helpers.py."""

import numpy as np
import pytest

from flax_helpers import REPO  # noqa: F401  (puts the repo root on sys.path)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    from tools.make_tiny_pipeline import make_pipeline

    return make_pipeline(str(tmp_path_factory.mktemp("flax-pipelines") / "tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("flax-images")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(80, 96), (64, 64), (120, 90)]):
        pixels = (rng.random(size + (3,)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"image {i}.png")
    return str(folder)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One persistent XLA cache for every trainer subprocess: identical steps compile once."""
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="session")
def transformers5_pipeline(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline with its text encoder re-saved by transformers 5 (.venv): keys lose `text_model.`."""
    import shutil

    from flax_helpers import run_torch_python

    folder = str(tmp_path_factory.mktemp("flax-pipelines") / "tiny-transformers5")
    shutil.copytree(tiny_pipeline, folder)
    shutil.rmtree(f"{folder}/text_encoder")
    info = run_torch_python(
        "import json, sys, transformers\n"
        "from transformers import CLIPTextConfig, CLIPTextModel\n"
        "from safetensors import safe_open\n"
        "src, dst = sys.argv[1], sys.argv[2]\n"
        "model = CLIPTextModel(CLIPTextConfig.from_pretrained(src))\n"  # a model built by transformers 5 itself
        "model.load_state_dict(CLIPTextModel.from_pretrained(src).state_dict())\n"
        "model.save_pretrained(dst)\n"
        "with safe_open(dst + '/model.safetensors', 'np') as f: keys = list(f.keys())\n"
        "print(json.dumps({'version': transformers.__version__, 'keys': keys}))\n",
        f"{tiny_pipeline}/text_encoder", f"{folder}/text_encoder")
    assert info["version"].startswith("5."), info["version"]
    # The layout this fixture exists for: no key carries the prefix.
    assert info["keys"] and not any(k.startswith("text_model.") for k in info["keys"])
    return folder
