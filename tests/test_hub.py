"""--push_to_hub end to end against tests/fake_hub.py (a local server speaking the Hub HTTP API the
installed huggingface_hub client uses): what arrives, the model card, and fast failures."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import REPO, base_args, run_script
from fake_hub import FakeHub
from local_paths import paths_of_this_machine, scan
from webui_safe_loader import check_file, pickled_files

HUB_TOKEN = "hf_FakeSecretToken0123456789abcdefXYZ"
USER = "fake-user"


def hub_env(endpoint, hf_home, disable_xet=True):
    """Online (HF_HUB_OFFLINE unset), a private HF_HOME with no stored login, no HF_TOKEN."""
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "HF_TOKEN": "",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_XET": "1" if disable_xet else "0"}
    return env


def free_closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends: connections are refused


def all_files(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            yield os.path.join(root, name)


@pytest.fixture(scope="module")
def pushed_run(tiny_pipeline, train_images, tmp_path_factory):
    """One training run with --push_to_hub into a fake hub whose LFS is the classic basic transfer."""
    out = tmp_path_factory.mktemp("push") / "my-concept"
    hf_home = tmp_path_factory.mktemp("hf_home")
    argv = base_args(tiny_pipeline, train_images, str(out), max_train_steps=2, checkpointing_steps=1, save_steps=1,
                     validation_prompt="a photo of <cat-toy>", validation_steps=2, num_validation_images=1,
                     report_to="tensorboard", push_to_hub=True, hub_token=HUB_TOKEN, num_vectors=2)
    with FakeHub(token=HUB_TOKEN, user=USER, lfs_policy="lfs") as hub:
        result = run_script(argv, env=hub_env(hub.endpoint, hf_home))
    return out, hub, result


def test_push_uploads_the_result_and_nothing_else(pushed_run):
    out, hub, result = pushed_run
    assert result.returncode == 0, result.stderr[-4000:]
    repo_id = f"{USER}/my-concept"
    assert list(hub.repos) == [repo_id]
    files = hub.files(repo_id)
    for name in ("learned_embeds.safetensors", "learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt",
                 "cat-toy.pt", "cat-toy.safetensors", "README.md", "loss.png", "validation/step-000002-0.png",
                 "model_index.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json"):
        assert name in files, f"{name} was not uploaded; got {sorted(files)}"
    for path in files:
        assert not path.startswith(("checkpoint-", "logs/", ".tmp-")), path
        assert "learned_embeds-steps-" not in path and ".lock" not in path, path
    # Every uploaded byte is the local file's byte.
    for path, data in files.items():
        with open(out / path, "rb") as f:
            assert f.read() == data, path
    # The local run did write what was left out, so the ignore rules were exercised.
    local = {os.path.relpath(p, out) for p in all_files(out)}
    assert any(p.startswith("checkpoint-") for p in local) and any(p.startswith("logs/") for p in local)
    assert any(p.startswith("learned_embeds-steps-") for p in local)
    # The binaries went through LFS (upload + verify), the card inline; every API call was authenticated.
    paths = [p for _, p, _ in hub.requests]
    assert any(p.startswith("/lfs-upload/") for p in paths) and any(p.endswith("/info/lfs/objects/batch") for p in paths)
    assert all(ok for method, p, ok in hub.requests if p.startswith(("/api/repos", "/api/models")))
    assert hub.repos[repo_id]["commits"] == ["End of training"]


def test_hub_token_is_never_written_or_uploaded(pushed_run):
    out, hub, result = pushed_run
    assert result.returncode == 0, result.stderr[-4000:]
    secret = HUB_TOKEN.encode()
    leaked = [p for p in all_files(out) if secret in open(p, "rb").read()]
    assert leaked == []
    assert [p for p, data in hub.files(f"{USER}/my-concept").items() if secret in data] == []
    assert HUB_TOKEN not in result.stdout and HUB_TOKEN not in result.stderr
    assert all(HUB_TOKEN not in card for card in hub.yaml_checked)


def test_model_card(pushed_run, tiny_pipeline):
    out, hub, result = pushed_run
    assert result.returncode == 0, result.stderr[-4000:]
    card = hub.files(f"{USER}/my-concept")["README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    # A local base model is named by its folder's name; base_model (a hub id field) is left out.
    assert "base_model" not in meta and "the local model `tiny`" in card and tiny_pipeline not in card
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["instance_prompt"] == "<cat-toy>"
    assert {"textual_inversion", "stable-diffusion", "diffusers", "text-to-image"} <= set(meta["tags"])
    body = card.split("---\n", 2)[2]
    assert f'pipe.load_textual_inversion("{USER}/my-concept")' in body
    assert "from diffusers import StableDiffusionPipeline" in body and "<cat-toy>" in body
    assert "AUTOMATIC1111" in body and "`cat-toy.pt`" in body and "embeddings/" in body
    assert "ComfyUI" in body and "embedding:cat-toy" in body
    assert "](./validation/step-000002-0.png)" in body  # the sample image is in the gallery and uploaded
    assert "2 vectors" in body
    assert hub.yaml_checked and hub.yaml_checked[-1] == card  # the client validated it before committing


def test_model_card_of_a_hub_model_links_and_declares_it():
    from textual_inversion_core import hub

    card = hub.model_card("me/cat-toy", "some-org/some-model", "<cat-toy>", "object", 1,
                          export_formats=("a1111", "kohya"))
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "some-org/some-model"
    assert "[some-org/some-model](https://huggingface.co/some-org/some-model)" in card
    assert 'StableDiffusionPipeline.from_pretrained("some-org/some-model")' in card


def test_no_pushed_or_written_file_names_a_path_of_the_training_machine(pushed_run, tiny_pipeline, train_images,
                                                                       tmp_path_factory):
    """Every file of the output folder and every uploaded file: no model, data or output folder path, no home
    directory, nothing under the test session's temporary root (where the fake hub's HF_HOME is too)."""
    out, hub, result = pushed_run
    assert result.returncode == 0, result.stderr[-4000:]
    needles = paths_of_this_machine(tiny_pipeline, train_images, out, tmp_path_factory.getbasetemp())
    # logs/ is the TensorBoard record of the run's flags, written by the trainer scripts (cli.public_config) and
    # never uploaded (hub.UPLOAD_IGNORE); every other file is scanned.
    scanned, hits = scan(str(out), needles, skip=("logs/",))
    assert hits == {}
    for name in ("README.md", "cat-toy.pt", "cat-toy.safetensors", "learned_embeds.bin", "learned_embeds-steps-1.bin",
                 "model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json", "checkpoint-2/training_state.json"):
        assert name in scanned, name
    uploaded = hub.files(f"{USER}/my-concept")
    assert uploaded and {p: [n for n in needles if n.encode() in data] for p, data in uploaded.items()
                         if any(n.encode() in data for n in needles)} == {}


def test_saved_pipeline_configs_record_the_hub_id_not_the_hub_cache(tmp_path, monkeypatch):
    """A hub model is read from the Hub cache in the home folder; its saved configs name the hub id instead."""
    import json

    from textual_inversion_core import outputs

    monkeypatch.chdir(tmp_path)
    cache = "/home/someone/.cache/huggingface/hub/models--org--model/snapshots/0123abcd"
    configs = {"model_index.json": {"_class_name": "StableDiffusionPipeline", "_name_or_path": "org/model",
                                    "unet": ["diffusers", "UNet2DConditionModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                                    "safety_checker": [None, None]},
               "unet/config.json": {"_name_or_path": cache + "/unet", "sample_size": 8},
               "tokenizer/tokenizer_config.json": {"name_or_path": cache + "/tokenizer", "model_max_length": 77},
               "notes/config.json": {"_name_or_path": cache}}  # not a part listed in model_index.json
    for name, config in configs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(config))
    rewritten = outputs.replace_local_model_paths(str(tmp_path), "org/model")
    assert sorted(os.path.relpath(p, tmp_path) for p in rewritten) == ["tokenizer/tokenizer_config.json",
                                                                       "unet/config.json"]
    assert json.loads((tmp_path / "unet" / "config.json").read_text()) == {"_name_or_path": "org/model",
                                                                           "sample_size": 8}
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["name_or_path"] == "org/model"
    assert json.loads((tmp_path / "model_index.json").read_text())["_name_or_path"] == "org/model"


def test_pushed_pickle_files_pass_the_webui_checks_and_load(pushed_run, tiny_pipeline):
    """What the trainer writes for the webui (and diffusers' .bin) passes the webui's safe-loader checks and reads
    back with weights_only=True as the vectors of the matching .safetensors; the .pt names the base model as the
    webui's own trainer does (name, short hash)."""
    import hashlib

    import torch
    from safetensors.numpy import load_file

    out, hub, result = pushed_run
    assert result.returncode == 0, result.stderr[-4000:]
    found = pickled_files(str(out))
    assert found == ["cat-toy.pt", "learned_embeds-steps-1.bin", "learned_embeds-steps-2.bin", "learned_embeds.bin"]
    for name in found:
        seen = check_file(str(out / name))
        assert seen["layout"] == "legacy" and seen["storages"] == 1, (name, seen)
        loaded = torch.load(out / name, map_location="cpu", weights_only=True)
        tensor = loaded["string_to_param"]["*"] if name.endswith(".pt") else loaded["<cat-toy>"]
        sibling = "learned_embeds.safetensors" if name.endswith(".pt") else name.replace(".bin", ".safetensors")
        np.testing.assert_array_equal(tensor.numpy(), load_file(str(out / sibling))["<cat-toy>"], err_msg=name)
    webui = torch.load(out / "cat-toy.pt", weights_only=True)
    weights = open(os.path.join(tiny_pipeline, "text_encoder", "model.safetensors"), "rb").read()
    assert webui["sd_checkpoint_name"] == "tiny"
    assert webui["sd_checkpoint"] == hashlib.sha256(weights).hexdigest()[:10]


def test_upload_through_the_xet_enabled_client(pushed_run, tmp_path):
    """With hf_xet installed the client takes its pipelined path; a hub that answers every file as a
    regular blob gets the whole folder inline in the commit. (The xet CAS transfer itself is not faked.)"""
    out, _, result = pushed_run
    assert result.returncode == 0, result.stderr[-4000:]
    with FakeHub(token=HUB_TOKEN, user=USER, lfs_policy="regular") as hub:
        env = dict(os.environ, **hub_env(hub.endpoint, tmp_path, disable_xet=False), PYTHONPATH=REPO)
        code = (f"from textual_inversion_core import hub; "
                f"print(hub.upload({str(out)!r}, 'other-name', token={HUB_TOKEN!r}))")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().endswith(f"{USER}/other-name")
        files = hub.files(f"{USER}/other-name")
    paths = [p for _, p, _ in hub.requests]
    assert not any(p.startswith("/lfs-upload/") for p in paths)
    expected = {os.path.relpath(p, out) for p in all_files(out)}
    expected = {p for p in expected if not p.startswith(("checkpoint-", "logs/", "learned_embeds-steps-", ".tmp-"))}
    assert set(files) == expected


def test_push_fails_fast_when_the_hub_is_unreachable(tiny_pipeline, train_images, tmp_path):
    port = free_closed_port()
    argv = base_args(tiny_pipeline, train_images, str(tmp_path / "out"), push_to_hub=True, hub_token=HUB_TOKEN,
                     max_train_steps=50)
    started = time.monotonic()
    result = run_script(argv, env=hub_env(f"http://127.0.0.1:{port}", tmp_path / "hf_home"), timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "--push_to_hub: cannot reach the Hub or not logged in" in last and "hf auth login" in last
    assert "Traceback" not in result.stderr and HUB_TOKEN not in result.stderr
    assert "Running training" not in result.stderr  # failed before the training loop
    assert not os.path.exists(tmp_path / "out" / "learned_embeds.safetensors")
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"


def test_push_fails_fast_when_not_logged_in_or_offline(tmp_path, monkeypatch):
    """The same preflight the trainers call, against a running fake hub: no login, a wrong token, offline."""
    import argparse

    import huggingface_hub.constants as hf_constants

    from textual_inversion_core import hub as hub_module
    from textual_inversion_core.errors import UserError

    with FakeHub(token=HUB_TOKEN, user=USER) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def args(token):
            return argparse.Namespace(hub_token=token, hub_model_id=None, output_dir=str(tmp_path / "my-out"))

        assert hub_module.preflight(args(HUB_TOKEN)) == f"{USER}/my-out"
        for token in (None, "hf_wrong"):
            with pytest.raises(UserError, match="cannot reach the Hub or not logged in.*hf auth login") as info:
                hub_module.preflight(args(token))
            assert "\n" not in str(info.value)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
            hub_module.preflight(args(HUB_TOKEN))
