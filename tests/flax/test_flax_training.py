"""End-to-end runs of textual_inversion_flax.py on the tiny pipeline (subprocesses, forced CPU devices).

The runs are shared by the tests of this module:
  two_devices  2 devices x batch 1, checkpoints, validation, full Flax pipeline, TensorBoard
  one_device   1 device x batch 2 (the same global batch), checkpoints every 2 steps
  resumed      one_device's checkpoint-2 resumed to step 4 in a fresh output_dir
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import textual_inversion_flax as ti_flax
from flax_backend.weights import load_component
from helpers import (
    FLAX_SCRIPT,
    TORCH_PYTHON,
    TORCH_SCRIPT,
    flax_base_args,
    read_vectors,
    run_flax,
    run_flax_in_process,
    run_torch_python,
)
from textual_inversion_core.cli import flag_names

STEPS = 4
PLACEHOLDER_TOKENS = ["<cat-toy>", "<cat-toy>_1"]


@pytest.fixture(scope="module")
def runs(tiny_pipeline, train_images, compile_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("flax-runs")
    out = {name: str(root / name) for name in ("two_devices", "one_device", "resumed")}
    run_flax(flax_base_args(tiny_pipeline, train_images, out["two_devices"], train_batch_size=1, checkpointing_steps=2,
                            save_steps=2, validation_prompt="a photo of <cat-toy>", num_validation_images=1,
                            validation_steps=STEPS, save_as_full_pipeline=True, report_to="tensorboard"),
             devices=2, cache=compile_cache)
    run_flax_in_process(flax_base_args(tiny_pipeline, train_images, out["one_device"], train_batch_size=2,
                                       checkpointing_steps=2, save_steps=2), cache=compile_cache)
    os.makedirs(out["resumed"])
    shutil.copytree(os.path.join(out["one_device"], "checkpoint-2"), os.path.join(out["resumed"], "checkpoint-2"))
    proc = run_flax_in_process(flax_base_args(tiny_pipeline, train_images, out["resumed"], train_batch_size=2,
                                              resume_from_checkpoint="latest"), cache=compile_cache)
    assert "resumed from" in proc.stderr
    return out


def test_help_lists_the_same_flags_as_the_pytorch_script():
    import re
    import subprocess
    import sys

    def flags_in_help(python, script):
        proc = subprocess.run([python, script, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return sorted(set(re.findall(r"^  (--[a-z][a-z0-9_]*)", proc.stdout, re.MULTILINE)) - {"--help"})

    flax_flags = flags_in_help(sys.executable, FLAX_SCRIPT)
    torch_flags = flags_in_help(TORCH_PYTHON, TORCH_SCRIPT)
    assert flax_flags == torch_flags == flag_names()
    assert "--enable_xformers_memory_efficient_attention" in flax_flags and "--resume_from_checkpoint" in flax_flags


def test_two_device_run_writes_every_output(runs):
    out = runs["two_devices"]
    for name in ("learned_embeds.bin", "learned_embeds.safetensors", "token_identifier.txt", "type_of_concept.txt",
                 "learned_embeds-steps-2.bin", "learned_embeds-steps-2.safetensors", "learned_embeds-steps-4.safetensors",
                 "checkpoint-2/training_state.safetensors", "checkpoint-4/training_state.json",
                 "validation/step-000004-0.png", "model_index.json", "text_encoder/flax_model.msgpack",
                 "unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack", "tokenizer/added_tokens.json",
                 "loss.png", "cat-toy.pt", "cat-toy.safetensors"):
        assert os.path.isfile(os.path.join(out, name)), name
    from PIL import Image

    assert Image.open(os.path.join(out, "loss.png")).format == "PNG"
    assert open(os.path.join(out, "token_identifier.txt")).read() == "<cat-toy>"
    assert open(os.path.join(out, "type_of_concept.txt")).read() == "object"
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(os.path.join(out, "logs")) for f in files)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"), token="<cat-toy>")  # the only key
    assert vectors.dtype == np.float32 and vectors.shape == (2, 32)
    # The final file equals the last step file and the last checkpoint: one set of trained vectors.
    np.testing.assert_array_equal(read_vectors(os.path.join(out, "learned_embeds-steps-4.safetensors")), vectors)
    from safetensors.numpy import load_file

    state = json.load(open(os.path.join(out, "checkpoint-4", "training_state.json")))
    tensors = load_file(os.path.join(out, "checkpoint-4", "training_state.safetensors"))
    assert set(tensors) == {"vectors", "exp_avg", "exp_avg_sq"}
    np.testing.assert_array_equal(tensors["vectors"], vectors)
    assert state["step"] == 4 and state["optimizer_step"] == 4 and state["num_vectors"] == 2
    assert state["global_batch"] == 2 and state["seed"] == 7 and state["framework"] == "flax"
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["safety_checker"] == [None, None], "no safety checker may be fetched or saved"


def test_every_vector_trained_and_starts_from_the_initializer(runs, tiny_pipeline):
    from transformers import CLIPTokenizer

    vectors = read_vectors(os.path.join(runs["two_devices"], "learned_embeds.safetensors"))
    import jax.numpy as jnp

    _, te_params, _ = load_component(tiny_pipeline, "text_encoder", None, jnp.float32)
    table = te_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    toy = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer").encode("toy", add_special_tokens=False)[0]
    for row in vectors:
        assert np.abs(row - table[toy]).max() > 1e-3  # moved away from the start
        assert np.abs(row - table[toy]).max() < 1.0  # but trained from it, 4 steps at lr 5e-3


def test_two_devices_equal_one_device_with_the_same_global_batch(runs):
    two = read_vectors(os.path.join(runs["two_devices"], "learned_embeds.safetensors"))
    one = read_vectors(os.path.join(runs["one_device"], "learned_embeds.safetensors"))
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    # The step-2 embedding too: the same examples in the same order, not only a similar end point.
    np.testing.assert_allclose(read_vectors(os.path.join(runs["two_devices"], "learned_embeds-steps-2.safetensors")),
                               read_vectors(os.path.join(runs["one_device"], "learned_embeds-steps-2.safetensors")),
                               rtol=0, atol=1e-6)


def test_resume_equals_uninterrupted(runs):
    resumed = read_vectors(os.path.join(runs["resumed"], "learned_embeds.safetensors"))
    straight = read_vectors(os.path.join(runs["one_device"], "learned_embeds.safetensors"))
    at_two = read_vectors(os.path.join(runs["one_device"], "learned_embeds-steps-2.safetensors"))
    assert np.abs(resumed - at_two).max() > 1e-4  # the resumed run did train steps 3 and 4
    np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


def test_outputs_load_in_pytorch_diffusers(runs, tiny_pipeline):
    """load_textual_inversion (PyTorch env) gives rows equal to the trained vectors; other rows unchanged."""
    out = runs["two_devices"]
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    result = run_torch_python(
        "import json, sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "model, out, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "rows = {}\n"
        "for source in (out, out + '/learned_embeds.bin', out + '/learned_embeds.safetensors'):\n"
        "    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)\n"
        "    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()\n"
        "    pipe.load_textual_inversion(source)\n"
        "    after = pipe.text_encoder.get_input_embeddings().weight.detach()\n"
        "    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)\n"
        "    unchanged = bool(torch.equal(after[: before.shape[0]], before))\n"
        "    rows[source] = {'ids': ids, 'rows': after[ids].tolist(), 'old_rows_unchanged': unchanged,\n"
        "                    'vocab': len(pipe.tokenizer), 'old_vocab': before.shape[0]}\n"
        "print(json.dumps(rows))\n",
        tiny_pipeline, out, json.dumps(PLACEHOLDER_TOKENS))
    assert len(result) == 3
    for source, info in result.items():
        assert info["old_rows_unchanged"], source
        assert info["vocab"] == info["old_vocab"] + 2 and info["ids"] == [info["old_vocab"], info["old_vocab"] + 1]
        np.testing.assert_array_equal(np.asarray(info["rows"], np.float32), vectors)


def test_saved_flax_pipeline_loads_and_only_the_new_rows_differ(runs, tiny_pipeline):
    assert_pipeline_is_the_original_plus_learned_rows(runs["two_devices"], tiny_pipeline)


def assert_pipeline_is_the_original_plus_learned_rows(out, tiny_pipeline):
    import jax.numpy as jnp
    from diffusers import FlaxStableDiffusionPipeline
    from flax.traverse_util import flatten_dict

    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    ids = pipeline.tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKENS)
    saved_table = np.asarray(params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(saved_table[ids], vectors)
    for name in ("text_encoder", "unet", "vae"):
        _, original, _ = load_component(tiny_pipeline, name, None, jnp.float32)
        saved, original = flatten_dict(params[name]), flatten_dict(original)
        assert set(saved) == set(original), name
        for key, value in original.items():
            value, stored = np.asarray(value), np.asarray(saved[key])
            assert stored.dtype == np.float32, "/".join(key)
            if key[-2:] == ("token_embedding", "embedding"):
                assert stored.shape == (value.shape[0] + 2, value.shape[1])
                stored = stored[: value.shape[0]]
            np.testing.assert_array_equal(stored, value, err_msg="/".join(key))


def test_pytorch_trainer_resumes_a_flax_checkpoint(runs, tiny_pipeline, train_images, tmp_path):
    """Checkpoints are framework-neutral: textual_inversion.py continues from the Flax checkpoint-2."""
    from helpers import run_script

    out = str(tmp_path / "torch-resume")
    os.makedirs(out)
    shutil.copytree(os.path.join(runs["one_device"], "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    proc = run_script(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=2, max_train_steps=3,
                                     resume_from_checkpoint="latest"), TORCH_SCRIPT, python=TORCH_PYTHON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "another global batch" not in proc.stderr
    at_two = read_vectors(os.path.join(runs["one_device"], "learned_embeds-steps-2.safetensors"))
    torch_three = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    # One AdamW step of lr 5e-3 with the restored moments: moved, by at most a few learning rates.
    assert 1e-4 < np.abs(torch_three - at_two).max() < 5 * 5e-3


def test_transformers5_pipeline_trains_with_the_real_weights(runs, transformers5_pipeline, train_images,
                                                              compile_cache, tmp_path):
    """The same run on the transformers-5 (unprefixed) copy of the pipeline gives the same vectors: it
    trained with the real text-encoder weights (random ones would give other vectors)."""
    out = str(tmp_path / "transformers5")
    proc = run_flax_in_process(flax_base_args(transformers5_pipeline, train_images, out, train_batch_size=2),
                               cache=compile_cache)
    assert "text_model. prefix added" in proc.stderr
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    reference = read_vectors(os.path.join(runs["one_device"], "learned_embeds.safetensors"))
    np.testing.assert_array_equal(vectors, reference)


def test_gradient_accumulation_equals_the_larger_batch(runs, tiny_pipeline, train_images, compile_cache, tmp_path):
    """2 micro-batches of 1 draw the same examples as 1 batch of 2 and average the same gradients."""
    out = str(tmp_path / "accumulated")
    run_flax_in_process(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=1,
                                       gradient_accumulation_steps=2, checkpointing_steps=STEPS), cache=compile_cache)
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    reference = read_vectors(os.path.join(runs["one_device"], "learned_embeds.safetensors"))
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=1e-6)
    state = json.load(open(os.path.join(out, f"checkpoint-{STEPS}", "training_state.json")))
    assert state["global_batch"] == 2


def test_memory_efficient_attention_trains_the_same_vectors(runs, tiny_pipeline, train_images, compile_cache,
                                                           tmp_path):
    """--enable_xformers_memory_efficient_attention selects diffusers' chunked JAX attention: the same
    softmax in blocks, recomputed in the backward. The result matches the plain run; the saved pipeline
    keeps the plain config (how attention is computed is not part of the model)."""
    out = str(tmp_path / "chunked-attention")
    run_flax_in_process(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=2, checkpointing_steps=2,
                                       enable_xformers_memory_efficient_attention=True, save_as_full_pipeline=True),
                        cache=compile_cache)
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    reference = read_vectors(os.path.join(runs["one_device"], "learned_embeds.safetensors"))
    assert not np.array_equal(vectors, read_vectors(os.path.join(runs["one_device"], "learned_embeds-steps-2.safetensors")))
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=1e-5)
    config = json.load(open(os.path.join(out, "unet", "config.json")))
    assert config.get("use_memory_efficient_attention", False) is False


@pytest.fixture(scope="module")
def bf16_run(tiny_pipeline, train_images, compile_cache, tmp_path_factory):
    """A bf16 run on 2 devices with accumulation, a cosine schedule, --scale_lr, validation images and a full
    pipeline save, read by the two tests below."""
    out = str(tmp_path_factory.mktemp("flax-bf16") / "bf16")
    proc = run_flax(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=1, gradient_accumulation_steps=2,
                                   mixed_precision="bf16", lr_scheduler="cosine", lr_warmup_steps=1, max_train_steps=3,
                                   scale_lr=True, checkpointing_steps=3, validation_prompt="a <cat-toy> toy",
                                   num_validation_images=2, validation_steps=3, save_as_full_pipeline=True),
                    devices=2, cache=compile_cache)
    return out, proc


def test_bf16_run_saves_the_pipeline_in_fp32_from_the_original_weights(bf16_run, tiny_pipeline):
    """The frozen weights train in bf16; the saved pipeline must not be those rounded copies."""
    out, _ = bf16_run
    assert_pipeline_is_the_original_plus_learned_rows(out, tiny_pipeline)


def test_bf16_schedule_and_scaled_lr(bf16_run, tiny_pipeline):
    out, proc = bf16_run
    assert "frozen weights bfloat16, learned vectors float32" in proc.stderr
    from PIL import Image

    for i in range(2):  # sampling works with bf16 weights too
        with Image.open(os.path.join(out, "validation", f"step-000003-{i}.png")) as image:
            assert image.size == (64, 64) and np.asarray(image).std() > 0
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
    state = json.load(open(os.path.join(out, "checkpoint-3", "training_state.json")))
    # --scale_lr: x batch per device (1) x devices (2) x accumulation (2)
    assert state["learning_rate"] == pytest.approx(5e-3 * 4) and state["global_batch"] == 4
    # lr per step: 0 (warmup), 2e-2, 1e-2 (cosine): the vectors moved, by about the sum of those at most.
    import jax.numpy as jnp
    from transformers import CLIPTokenizer

    _, te_params, _ = load_component(tiny_pipeline, "text_encoder", None, jnp.float32)
    toy = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer").encode("toy", add_special_tokens=False)[0]
    moved = np.abs(vectors - te_params["text_model"]["embeddings"]["token_embedding"]["embedding"][toy]).max()
    assert 1e-3 < moved < 0.1


def test_sigterm_saves_a_checkpoint_that_resumes(tiny_pipeline, train_images, compile_cache, tmp_path):
    """SIGTERM: the step in flight finishes, checkpoint-N and learned_embeds-steps-N are written, exit 130;
    --resume_from_checkpoint latest then finishes the run."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from helpers import jax_env, script_env

    out = str(tmp_path / "stopped")
    env = script_env(jax_env(devices=1, cache=compile_cache))
    log_path = str(tmp_path / "stderr.txt")
    argv = flax_base_args(tiny_pipeline, train_images, out, train_batch_size=2, max_train_steps=400)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, FLAX_SCRIPT] + argv, env=env, stderr=log, stdout=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not re.search(r"\b[2-9]/400\b", open(log_path).read()):
            assert proc.poll() is None, open(log_path).read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 130, open(log_path).read()[-3000:]
    (step,) = [int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert 2 <= step < 400
    assert os.path.isfile(os.path.join(out, f"learned_embeds-steps-{step}.safetensors"))
    assert not os.path.exists(os.path.join(out, "learned_embeds.safetensors"))  # the run is not finished
    proc = run_flax_in_process(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=2,
                                              max_train_steps=step + 1, resume_from_checkpoint="latest"),
                               cache=compile_cache)
    assert f"at step {step}" in proc.stderr
    assert os.path.isfile(os.path.join(out, "learned_embeds.safetensors"))


def run_jax_hosts(argvs, tmp_path, timeout, script=FLAX_SCRIPT):
    """The Flax trainer as len(argvs) JAX processes on localhost (1 CPU device each, gloo collectives)."""
    import sys

    from helpers import free_port, jax_env, run_hosts

    port = free_port()
    envs = [dict(jax_env(devices=1), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(len(argvs)),
                 JAX_PROCESS_ID=str(rank)) for rank in range(len(argvs))]
    return run_hosts([[sys.executable, script] + argv for argv in argvs], envs, tmp_path, timeout)


# Cross-process (gloo) sums add in another order than in-process ones. Vectors of size ~1e-2 after 4 steps at
# lr 5e-3 differed from the 1-process run by at most 6.6e-8 here: 2e-6 is float32 rounding with room. Resumed,
# vectors and AdamW moments (as small as 1e-8) are compared against their own size: at most 2.7e-6 of it here.
HOSTS_TOLERANCE = 2e-6
HOSTS_RELATIVE_TOLERANCE = 1e-4


# Runs the trainer with jax's shutdown barrier cut to 3 s and process 0's final save slowed by 12 s: without a
# barrier of our own after that save, process 1 reaches the shutdown barrier first and jax aborts both.
SLOW_FINAL_SAVE = r'''
import functools, os, runpy, sys, time
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
import jax
import textual_inversion_core.outputs as outputs

initialize = jax.distributed.initialize
jax.distributed.initialize = functools.partial(initialize, shutdown_timeout_seconds=3)
finish_run = outputs.finish_run

def slow_finish_run(*args, **kwargs):
    time.sleep(12)
    return finish_run(*args, **kwargs)

outputs.finish_run = slow_finish_run
runpy.run_path(script, run_name="__main__")
'''


@pytest.fixture(scope="module")
def two_hosts(tiny_pipeline, train_images, tmp_path_factory):
    """One 2-process run (batch 1 each), through SLOW_FINAL_SAVE: the tests below read its vectors, its folders and
    its exit codes (one run instead of two: a 2-process run compiles cold, jax's cache cannot serve gloo programs)."""
    root = tmp_path_factory.mktemp("flax-two-hosts")
    wrapper = root / "slow_final_save.py"
    wrapper.write_text(SLOW_FINAL_SAVE)
    outs = [str(root / f"host{i}") for i in range(2)]
    argvs = [[FLAX_SCRIPT] + flax_base_args(tiny_pipeline, train_images, out, train_batch_size=1) for out in outs]
    return outs, run_jax_hosts(argvs, root, timeout=420, script=str(wrapper))


def test_two_hosts_equal_one_host(runs, two_hosts):
    """Two JAX processes split every global batch: the result equals one process with the same global batch, and
    only process 0 writes files; process 1 does not even create its output folder."""
    outs, results = two_hosts
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "hosts = 2, devices = 2 (local 1)" in results[0][1]
    assert not os.path.exists(outs[1])
    vectors = read_vectors(os.path.join(outs[0], "learned_embeds.safetensors"))
    reference = read_vectors(os.path.join(runs["one_device"], "learned_embeds.safetensors"))
    print(f"2 JAX processes vs 1: max |diff| = {np.abs(vectors - reference).max():.3g}")
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=HOSTS_TOLERANCE)


def test_two_hosts_outlast_jax_shutdown_barrier_while_process_0_saves(two_hosts):
    outs, results = two_hosts
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert os.path.isfile(os.path.join(outs[0], "learned_embeds.safetensors"))


def test_two_hosts_resume_from_a_checkpoint_only_process_0_has(runs, tiny_pipeline, train_images, tmp_path):
    """Separate output folders (no shared disk): checkpoint-2 is in process 0's folder only. Process 0 decides the
    resume point and sends the checkpoint; both resume at step 2 and the result equals the uninterrupted run."""
    outs = [str(tmp_path / f"host{i}") for i in range(2)]
    shutil.copytree(os.path.join(runs["one_device"], "checkpoint-2"), os.path.join(outs[0], "checkpoint-2"))
    results = run_jax_hosts([flax_base_args(tiny_pipeline, train_images, out, train_batch_size=1,
                                            checkpointing_steps=2, resume_from_checkpoint="latest") for out in outs],
                            tmp_path, timeout=420)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "at step 2" in results[0][1]
    assert not os.path.exists(outs[1])
    for name in ("learned_embeds.safetensors", "checkpoint-4/training_state.safetensors"):
        got, want = (load_file(os.path.join(d, name)) for d in (outs[0], runs["one_device"]))
        for key in want:
            diff, size = float(np.abs(got[key] - want[key]).max()), float(np.abs(want[key]).max())
            print(f"resumed on 2 JAX processes, {name} {key}: max |diff| = {diff:.3g} (max |value| {size:.3g})")
            assert diff <= HOSTS_RELATIVE_TOLERANCE * size, (name, key, diff, size)


def test_a_file_missing_on_one_host_stops_every_host_in_one_line(runs, tiny_pipeline, train_images, tmp_path):
    """--init_from exists on process 0's disk only: both processes stop before any model loads, with one line that
    names the process and the file, instead of process 0 training alone and waiting for process 1 forever."""
    init_file = str(tmp_path / "host0-only" / "start.safetensors")
    os.makedirs(os.path.dirname(init_file))
    shutil.copy(os.path.join(runs["one_device"], "learned_embeds.safetensors"), init_file)
    argvs = [flax_base_args(tiny_pipeline, train_images, str(tmp_path / f"host{i}"), init_from=init_file)
             for i in range(2)]
    argvs[1] = [a.replace("host0-only", "not-on-host-1") for a in argvs[1]]
    results = run_jax_hosts(argvs, tmp_path, timeout=240)
    for code, stderr in results:
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1, stderr[-3000:]
        assert "process 1 of 2: --init_from" in errors[0] and "not-on-host-1" in errors[0], errors
        assert "Traceback" not in stderr


def test_push_to_hub_uploads_card_pipeline_and_no_token(tiny_pipeline, train_images, compile_cache, tmp_path,
                                                       monkeypatch):
    """--push_to_hub (hub calls replaced by recorders: no network here): preflight before training, then the
    model card, the embedding and a Flax pipeline are uploaded; the token is in no written file."""
    import jax

    from textual_inversion_core import hub

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    calls = []
    monkeypatch.setattr(hub, "preflight", lambda args: calls.append(("preflight", args.hub_token)) or "me/cat-toy")
    monkeypatch.setattr(hub, "upload", lambda folder, repo, token=None, logging_dir=None:
                        calls.append(("upload", folder, repo, token, logging_dir)))
    secret = "hf_secretTOKEN0123456789"
    out = str(tmp_path / "pushed")
    import signal

    handlers_before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    code = ti_flax.main(flax_base_args(tiny_pipeline, train_images, out, train_batch_size=2, max_train_steps=1,
                                       push_to_hub=True, hub_token=secret))
    assert code == 0
    assert calls == [("preflight", secret), ("upload", out, "me/cat-toy", secret, "logs")]
    card = open(os.path.join(out, "README.md")).read()
    assert "me/cat-toy" in card and "<cat-toy>" in card and "textual_inversion" in card
    for name in ("learned_embeds.safetensors", "model_index.json", "text_encoder/flax_model.msgpack"):
        assert os.path.isfile(os.path.join(out, name)), name
    for folder, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), name
    # main() gave the signal handlers of the calling process back.
    assert signal.getsignal(signal.SIGINT) is handlers_before[0] and signal.getsignal(signal.SIGTERM) is handlers_before[1]
