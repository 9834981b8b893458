"""SDXL in the PyTorch trainer, on the tiny SDXL pipeline (text encoders 32 and 48 wide, so a clip_l/clip_g
mix-up fails): both vector sets train, the files load in diffusers' StableDiffusionXLPipeline, nothing
else changes, resume and 2 processes are exact, and diffusers' SDXL script name and flags work."""

import os
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import REPO, base_args, read_vectors, run_in_process, run_script
from textual_inversion_core import checkpoints

SDXL_SCRIPT = os.path.join(REPO, "textual_inversion_sdxl.py")
WIDTHS = {"text_encoder": 32, "text_encoder_2": 48}
SETTINGS = dict(train_batch_size=2, max_train_steps=4, num_vectors=2, checkpointing_steps=2, save_steps=2,
                lr_scheduler="cosine", lr_warmup_steps=1)
VECTOR_TOLERANCE = 1e-6  # as tests/test_multiprocess.py: summation order of the all-reduce


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_pipeline, train_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-runs")
    out = {name: str(root / name) for name in ("full", "resumed", "double")}
    result = run_in_process(base_args(tiny_sdxl_pipeline, train_images, out["full"], save_as_full_pipeline=True,
                                      **SETTINGS))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "model = SDXL, trained: clip_l (text_encoder), clip_g (text_encoder_2)" in result.stderr, result.stderr[-2000:]
    os.makedirs(out["resumed"])
    shutil.copytree(os.path.join(out["full"], "checkpoint-2"), os.path.join(out["resumed"], "checkpoint-2"))
    # diffusers' SDXL script name: the same run, resumed
    result = run_script(base_args(tiny_sdxl_pipeline, train_images, out["resumed"], resume_from_checkpoint="latest",
                                  **SETTINGS), script=SDXL_SCRIPT)
    assert result.returncode == 0 and "resumed from" in result.stderr, result.stderr[-4000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script(base_args(tiny_sdxl_pipeline, train_images, out["double"], **dict(SETTINGS, train_batch_size=1)),
                        launcher=command, env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0 and "processes = 2" in result.stderr, result.stderr[-4000:]
    return out


def embedding_table(folder, name):
    return load_file(os.path.join(folder, name, "model.safetensors"))["text_model.embeddings.token_embedding.weight"]


def test_both_vector_sets_are_written_in_diffusers_and_webui_layouts(sdxl_runs, tiny_sdxl_pipeline):
    out = sdxl_runs["full"]
    first = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    second = read_vectors(os.path.join(out, "learned_embeds_2.safetensors"))
    assert first.shape == (2, WIDTHS["text_encoder"]) and second.shape == (2, WIDTHS["text_encoder_2"])
    import torch

    for name, vectors in (("learned_embeds", first), ("learned_embeds_2", second)):
        twin = torch.load(os.path.join(out, f"{name}.bin"), weights_only=True)
        assert list(twin) == ["<cat-toy>"] and np.array_equal(twin["<cat-toy>"].numpy(), vectors)
        assert os.path.isfile(os.path.join(out, f"{name}-steps-2.safetensors"))
    webui = load_file(os.path.join(out, "cat-toy.safetensors"))
    assert sorted(webui) == ["clip_g", "clip_l"]
    assert np.array_equal(webui["clip_l"], first) and np.array_equal(webui["clip_g"], second)
    assert open(os.path.join(out, "token_identifier.txt")).read() == "<cat-toy>"
    # Each set started at its own encoder's "toy" row and moved
    from transformers import CLIPTokenizer

    for name, vectors in (("text_encoder", first), ("text_encoder_2", second)):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_pipeline, subfolder=name.replace("text_encoder", "tokenizer"))
        toy = tokenizer.encode("toy", add_special_tokens=False)[0]
        start = embedding_table(tiny_sdxl_pipeline, name)[toy]
        assert not np.allclose(vectors, start[None]), name


def test_checkpoints_hold_both_sets_and_their_adam_moments(sdxl_runs):
    tensors, state = checkpoints.load_checkpoint(os.path.join(sdxl_runs["full"], "checkpoint-4"))
    assert sorted(tensors) == ["exp_avg", "exp_avg_2", "exp_avg_sq", "exp_avg_sq_2", "vectors", "vectors_2"]
    assert tensors["vectors_2"].shape == (2, WIDTHS["text_encoder_2"]) and state["text_encoders"] == 2
    assert np.array_equal(tensors["vectors"], read_vectors(os.path.join(sdxl_runs["full"], "learned_embeds.safetensors")))


def test_resume_equals_the_uninterrupted_run(sdxl_runs):
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        a, b = (read_vectors(os.path.join(sdxl_runs[run], name)) for run in ("full", "resumed"))
        assert np.array_equal(a, b), name


def test_two_processes_equal_one_with_the_same_global_batch(sdxl_runs):
    for name in ("learned_embeds-steps-2.safetensors", "learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        a, b = (read_vectors(os.path.join(sdxl_runs[run], name)) for run in ("full", "double"))
        assert float(np.abs(a - b).max()) <= VECTOR_TOLERANCE, name


def test_saved_pipeline_changes_only_the_new_rows(sdxl_runs, tiny_sdxl_pipeline):
    out = sdxl_runs["full"]
    files = {"text_encoder": "learned_embeds.safetensors", "text_encoder_2": "learned_embeds_2.safetensors"}
    for name, file in files.items():
        original, saved = (load_file(os.path.join(f, name, "model.safetensors")) for f in (tiny_sdxl_pipeline, out))
        assert sorted(saved) == sorted(original), name
        key = "text_model.embeddings.token_embedding.weight"
        rows = original[key].shape[0]
        assert np.array_equal(saved[key][:rows], original[key])
        assert np.array_equal(saved[key][rows:], read_vectors(os.path.join(out, file)))
        for other in original:
            if other != key:
                assert np.array_equal(saved[other], original[other]), (name, other)
    for name in ("unet", "vae"):
        original, saved = (load_file(os.path.join(f, name, "diffusion_pytorch_model.safetensors"))
                           for f in (tiny_sdxl_pipeline, out))
        assert sorted(saved) == sorted(original)
        assert all(np.array_equal(saved[k], original[k]) for k in original), name


def test_diffusers_sdxl_pipeline_loads_both_files_and_generates(sdxl_runs, tiny_sdxl_pipeline):
    import torch
    from diffusers import StableDiffusionXLPipeline

    out = sdxl_runs["full"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    pipe.load_textual_inversion(os.path.join(out, "learned_embeds.safetensors"), token="<cat-toy>",
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(os.path.join(out, "learned_embeds_2.safetensors"), token="<cat-toy>",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for tokenizer, text_encoder, file in ((pipe.tokenizer, pipe.text_encoder, "learned_embeds.safetensors"),
                                          (pipe.tokenizer_2, pipe.text_encoder_2, "learned_embeds_2.safetensors")):
        ids = tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
        rows = text_encoder.get_input_embeddings().weight.detach()[ids].numpy()
        assert np.array_equal(rows, read_vectors(os.path.join(out, file)))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of <cat-toy>", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_sdxl_script_has_every_flag_of_the_shared_cli():
    import re
    import subprocess

    from textual_inversion_core.cli import flag_names

    proc = subprocess.run([sys.executable, SDXL_SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(set(re.findall(r"^  (--[a-z][a-z0-9_]*)", proc.stdout, re.MULTILINE)) - {"--help"}) == flag_names()
    assert "--use_8bit_adam" in proc.stdout and proc.stdout.startswith("usage: textual_inversion_sdxl.py")


def test_8bit_adam_without_bitsandbytes_or_cuda_is_one_line(tiny_sdxl_pipeline, train_images, tmp_path):
    result = run_script(base_args(tiny_sdxl_pipeline, train_images, str(tmp_path / "out"), use_8bit_adam=True,
                                  max_train_steps=1), script=SDXL_SCRIPT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("textual_inversion_sdxl.py: error: --use_8bit_adam needs"), last


def test_embedding_of_the_other_family_is_refused_before_any_model_loads(sdxl_runs, tiny_pipeline, tiny_sdxl_pipeline,
                                                                         train_images, tmp_path, no_model_loading):
    import textual_inversion
    from textual_inversion_core.embeddings import write_diffusers
    from textual_inversion_core.errors import UserError

    sd_file = str(tmp_path / "sd" / "learned_embeds.safetensors")
    os.makedirs(os.path.dirname(sd_file))
    write_diffusers(os.path.dirname(sd_file), "<cat-toy>", np.ones((2, 32), np.float32))
    sdxl_file = os.path.join(sdxl_runs["full"], "cat-toy.safetensors")  # {"clip_l", "clip_g"}
    cases = [(tiny_sdxl_pipeline, sd_file, "SDXL"), (tiny_pipeline, sdxl_file, "is an SDXL embedding")]
    for model, init_from, needle in cases:
        with pytest.raises(UserError, match=needle) as info:
            textual_inversion.main(base_args(model, train_images, str(tmp_path / "out"), init_from=init_from,
                                             num_vectors=2, max_train_steps=1))
        assert "\n" not in str(info.value)
    sd_out = str(tmp_path / "sdxl-checkpoint-on-sd")
    os.makedirs(sd_out)
    shutil.copytree(os.path.join(sdxl_runs["full"], "checkpoint-2"), os.path.join(sd_out, "checkpoint-2"))
    with pytest.raises(UserError, match=r"made for SDXL \(2 text encoders\), this model is SD-1.x/2.x"):
        textual_inversion.main(base_args(tiny_pipeline, train_images, sd_out, resume_from_checkpoint="latest",
                                         **SETTINGS))


def test_sdxl_run_continues_from_its_own_webui_file(sdxl_runs, tiny_sdxl_pipeline, train_images, tmp_path):
    """--init_from the {"clip_l", "clip_g"} file: each encoder starts from its own part (lr 0 keeps them)."""
    out = str(tmp_path / "continued")
    result = run_in_process(base_args(tiny_sdxl_pipeline, train_images, out, num_vectors=2, max_train_steps=1,
                                      learning_rate=0, init_from=os.path.join(sdxl_runs["full"], "cat-toy.safetensors")))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        assert np.array_equal(read_vectors(os.path.join(out, name)), read_vectors(os.path.join(sdxl_runs["full"], name)))


def test_sdxl_push_uploads_both_files_the_sdxl_pipeline_and_an_sdxl_card(tiny_sdxl_pipeline, train_images,
                                                                          tmp_path):
    from fake_hub import FakeHub
    from test_hub import HUB_TOKEN, USER, hub_env

    out = tmp_path / "my-sdxl-concept"
    argv = base_args(tiny_sdxl_pipeline, train_images, str(out), max_train_steps=1, num_vectors=2, push_to_hub=True,
                     hub_token=HUB_TOKEN)
    with FakeHub(token=HUB_TOKEN, user=USER, lfs_policy="lfs") as hub:
        result = run_script(argv, env=hub_env(hub.endpoint, tmp_path / "hf_home"))
    assert result.returncode == 0, result.stderr[-4000:]
    files = hub.files(f"{USER}/my-sdxl-concept")
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors", "cat-toy.safetensors",
                 "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json", "model_index.json"):
        assert name in files, (name, sorted(files))
    card = files["README.md"].decode()
    assert "SDXL" in card and "text_encoder=pipe.text_encoder_2" in card.replace(" ", "")
    assert str(tiny_sdxl_pipeline) not in card  # no local path
