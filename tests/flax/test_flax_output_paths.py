"""The Flax trainer's files, pushed to the local fake hub (tests/fake_hub.py): none names a path of the training
machine, the .pt/.bin pass the AUTOMATIC1111 webui's safe-loader checks and load with weights_only=True, and
diffusers (PyTorch env) gives the same prompt embeddings from each of them."""

import os

import numpy as np
import pytest

from fake_hub import FakeHub
from helpers import FLAX_SCRIPT, flax_base_args, jax_env, read_vectors, run_script, run_torch_python
from local_paths import paths_of_this_machine, scan
from webui_safe_loader import check_file, pickled_files

HUB_TOKEN = "hf_FakeFlaxToken0123456789abcdefXYZ"
USER = "fake-user"
TOKEN = "<cat-toy>"


@pytest.fixture(scope="module")
def pushed(tiny_pipeline, train_images, compile_cache, tmp_path_factory):
    """Two steps with a step file and a checkpoint each step, --push_to_hub into the fake hub."""
    out = str(tmp_path_factory.mktemp("flax-push") / "flax-concept")
    hf_home = str(tmp_path_factory.mktemp("flax-hf-home"))
    argv = flax_base_args(tiny_pipeline, train_images, out, max_train_steps=2, save_steps=1, checkpointing_steps=1,
                          push_to_hub=True, hub_token=HUB_TOKEN)
    with FakeHub(token=HUB_TOKEN, user=USER) as hub:
        # Online against the fake hub only, with a private HF_HOME holding no login.
        env = dict(jax_env(cache=compile_cache), HF_ENDPOINT=hub.endpoint, HF_HOME=hf_home, HF_HUB_OFFLINE="0",
                   HF_TOKEN="", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1")
        run_script(argv, FLAX_SCRIPT, env=env, check=True)
    return out, hub.files(f"{USER}/flax-concept")


def test_no_written_or_pushed_file_names_a_path_of_the_training_machine(pushed, tiny_pipeline, train_images,
                                                                        tmp_path_factory):
    out, uploaded = pushed
    needles = paths_of_this_machine(tiny_pipeline, train_images, out, tmp_path_factory.getbasetemp())
    scanned, hits = scan(out, needles)
    assert hits == {}
    for name in ("README.md", "cat-toy.pt", "cat-toy.safetensors", "learned_embeds.bin", "learned_embeds-steps-1.bin",
                 "model_index.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                 "checkpoint-2/training_state.json"):
        assert name in scanned, name
    assert "README.md" in uploaded and "cat-toy.pt" in uploaded
    assert [p for p, data in uploaded.items() if any(n.encode() in data for n in needles)] == []


def test_pickle_files_pass_the_webui_checks_and_load_with_weights_only(pushed, tiny_pipeline):
    import hashlib

    import torch

    out, _ = pushed
    found = pickled_files(out)
    assert found == ["cat-toy.pt", "learned_embeds-steps-1.bin", "learned_embeds-steps-2.bin", "learned_embeds.bin"]
    for name in found:
        seen = check_file(os.path.join(out, name))
        assert seen["layout"] == "legacy" and seen["storages"] == 1, (name, seen)
        loaded = torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
        tensor = loaded["string_to_param"]["*"] if name.endswith(".pt") else loaded[TOKEN]
        sibling = "learned_embeds.safetensors" if name.endswith(".pt") else name.replace(".bin", ".safetensors")
        np.testing.assert_array_equal(tensor.numpy(), read_vectors(os.path.join(out, sibling)), err_msg=name)
    webui = torch.load(os.path.join(out, "cat-toy.pt"), weights_only=True)
    with open(os.path.join(tiny_pipeline, "text_encoder", "model.safetensors"), "rb") as f:
        expected_hash = hashlib.sha256(f.read()).hexdigest()[:10]
    assert (webui["sd_checkpoint_name"], webui["sd_checkpoint"]) == ("tiny", expected_hash)


def test_every_embedding_file_gives_the_same_prompt_embeddings_in_diffusers(pushed, tiny_pipeline):
    out, _ = pushed
    result = run_torch_python(
        "import json, sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "model, out, token = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "embeds = {}\n"
        "for name, kwargs in [('', {}), ('learned_embeds.bin', {}), ('learned_embeds-steps-2.bin', {}),\n"
        "                     ('cat-toy.pt', {'token': token}), ('cat-toy.safetensors', {'token': token})]:\n"
        "    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)\n"
        "    pipe.load_textual_inversion(out + '/' + name if name else out, **kwargs)\n"
        "    with torch.no_grad():\n"
        "        e, _ = pipe.encode_prompt(f'a photo of {token} on a table', 'cpu', 1, False)\n"
        "    embeds[name or 'folder'] = e.flatten().tolist()\n"
        "print(json.dumps(embeds))\n",
        tiny_pipeline, out, TOKEN)
    assert len(result) == 5
    reference = np.asarray(result.pop("folder"), np.float32)
    for name, values in result.items():
        np.testing.assert_array_equal(np.asarray(values, np.float32), reference, err_msg=name)
