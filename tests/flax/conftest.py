"""Fixtures of the Flax tests (run in .venv-flax): an XLA cache and a transformers-5 copy of the tiny
pipeline. The tiny pipeline, the training images and the helpers are shared with tests/, in helpers.py."""

import os
import sys

import pytest

# tests/ holds helpers.py; pytest puts only this folder on sys.path when it runs tests/flax alone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_pipeline, tiny_sdxl_pipeline, train_images  # noqa: E402

__all__ = ["tiny_pipeline", "tiny_sdxl_pipeline", "train_images"]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One persistent XLA cache for every trainer subprocess: identical steps compile once."""
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="session")
def transformers5_pipeline(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline with its text encoder re-saved by transformers 5 (.venv): keys lose `text_model.`."""
    import shutil

    from helpers import run_torch_python

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
