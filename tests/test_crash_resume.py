"""Crashes at any moment (kill -9 mid-save and at random times), exact resume, signals, non-finite
loss: what a multi-hour run meets. Every assertion compares against an uninterrupted run."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import REPO, TORCH_SCRIPT, base_args, run_in_process, run_script, script_env, write_images
from textual_inversion_core import checkpoints

TOKEN = "<cat-toy>"


def final_vectors(out, name="learned_embeds.safetensors"):
    return load_file(os.path.join(out, name))[TOKEN]


def max_diff(a, b):
    return float(np.abs(a - b).max())


def start(argv, log_path, env=None):
    """The trainer as a background process, stdout+stderr into log_path."""
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, TORCH_SCRIPT] + list(argv), cwd=REPO, env=script_env(env),
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process


def wait_until(condition, process, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"trainer exited early with {process.returncode}"
        time.sleep(0.02)
    process.kill()
    raise AssertionError("timed out waiting for the trainer")


def log_has(log_path, text):
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return text in f.read()


def assert_everything_readable(out):
    """What a crash may leave: complete checkpoint-N folders and complete embedding files only."""
    for step, path in checkpoints.list_checkpoints(out):
        tensors, state = checkpoints.load_checkpoint(path)
        assert state["step"] == step and np.isfinite(tensors["vectors"]).all(), path
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.endswith(".safetensors"):
            load_file(path)
        elif name.endswith(".bin"):
            torch.load(path, weights_only=True)
        elif name.endswith(".png"):  # e.g. the loss plot
            from PIL import Image

            with Image.open(path) as image:
                image.verify()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 5 images, repeats 1: an epoch is 5 examples, so steps of 4 examples cross epoch boundaries mid-step.
    return write_images(tmp_path_factory.mktemp("crash") / "images", count=5)


# One setting shared by the reference and the interrupted runs: accumulation, 2 vectors, a schedule
# with warmup that is still changing when the run is interrupted, and epochs ending inside a step.
COMMON = dict(max_train_steps=8, train_batch_size=2, gradient_accumulation_steps=2, repeats=1, num_vectors=2,
              lr_scheduler="cosine", lr_warmup_steps=3, learning_rate=5e-3, checkpointing_steps=1, save_steps=1)


@pytest.fixture(scope="module")
def reference(tiny_pipeline, data, tmp_path_factory):
    """The uninterrupted run, with a checkpoint after every step."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    result = run_in_process(base_args(tiny_pipeline, data, out, **COMMON))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_resume_mid_epoch_with_accumulation_is_exact(tiny_pipeline, data, reference, tmp_path):
    """Stopped after step 3 (example 12 = epoch 2, position 2; warmup just over): resumed equals uninterrupted."""
    stop_at = 3
    full = reference
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(full, f"checkpoint-{stop_at}"), os.path.join(part, f"checkpoint-{stop_at}"))
    resumed = run_in_process(base_args(tiny_pipeline, data, part, resume_from_checkpoint="latest", seed=None, **COMMON))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stop_at}" in resumed.stderr
    diff = max_diff(final_vectors(part), final_vectors(reference))
    print(f"resume at step {stop_at}: max |diff| = {diff:.3g}")
    # Bit for bit: every posterior is encoded alone, so the resumed run's cache misses (other keys together than
    # the uninterrupted run's) give the same latents (1e-7-sized drift before LatentCache encoded one at a time).
    assert diff == 0.0
    for step in range(stop_at + 1, 9):
        a = checkpoints.load_checkpoint(os.path.join(full, f"checkpoint-{step}"))[0]
        b = checkpoints.load_checkpoint(os.path.join(part, f"checkpoint-{step}"))[0]
        for key in ("vectors", "exp_avg", "exp_avg_sq"):
            assert np.array_equal(a[key], b[key]), (step, key)


@pytest.mark.slow
def test_kill_9_during_checkpoint_save_then_resume_latest(tiny_pipeline, data, reference, tmp_path):
    settings = dict(COMMON, checkpointing_steps=2)
    out = str(tmp_path / "out")
    log = str(tmp_path / "killed.log")
    argv = base_args(tiny_pipeline, data, out, **settings)
    process = start(argv, log, env={"TEXTUAL_INVERSION_TEST_SAVE_PAUSE": "4:600"})

    def checkpoint_4_written_not_renamed():
        temps = [n for n in os.listdir(out) if n.startswith(".tmp-checkpoint-4-")] if os.path.isdir(out) else []
        return any(os.path.isfile(os.path.join(out, t, checkpoints.STATE_JSON)) for t in temps)

    wait_until(checkpoint_4_written_not_renamed, process)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL

    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2]  # the new one is invisible, the old intact
    assert checkpoints.resolve_checkpoint(out, "latest").endswith("checkpoint-2")
    assert_everything_readable(out)

    resumed = run_script(base_args(tiny_pipeline, data, out, resume_from_checkpoint="latest", **settings))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr
    diff = max_diff(final_vectors(out), final_vectors(reference))
    print(f"kill -9 mid-save, resumed: max |diff| = {diff:.3g}")
    assert diff == 0.0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 4, 6, 8]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # the killed save's folder is cleaned up


@pytest.mark.slow
def test_kill_9_at_random_moments_until_done(tiny_pipeline, data, reference, tmp_path):
    """Saving every step, kill -9 at random times, resume latest each time: ends equal to uninterrupted."""
    settings = COMMON  # a checkpoint and an embedding file after every step: many saves to hit
    uninterrupted = reference
    out = str(tmp_path / "out")
    argv = base_args(tiny_pipeline, data, out, resume_from_checkpoint="latest", **settings)
    rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "0")))
    outcomes = []
    for attempt in range(12):
        log = str(tmp_path / f"run-{attempt}.log")
        latest = max([s for s, _ in checkpoints.list_checkpoints(out)], default=0)
        process = start(argv, log)
        # A random moment after the next step or the one after (steps, not seconds: machine speed varies);
        # the first run dies before its first checkpoint, so "latest" must also cope with none.
        target = rng.randint(latest + 1, min(latest + 2, settings["max_train_steps"]))
        marker = "Running training" if attempt == 0 else f"checkpoint-{target}\n"
        wait_until(lambda: log_has(log, marker) or process.poll() is not None, process)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(60)
        assert process.returncode in (0, -signal.SIGKILL), open(log).read()[-3000:]
        if process.returncode == 0:
            outcomes.append("finished")
            break
        steps = [s for s, _ in checkpoints.list_checkpoints(out)] if os.path.isdir(out) else []
        mid_save = any(n.startswith(".tmp-") for n in os.listdir(out)) if os.path.isdir(out) else False
        outcomes.append(f"killed after checkpoint-{max(steps, default=0)}" + (" (mid-write)" if mid_save else ""))
        if os.path.isdir(out):
            assert_everything_readable(out)
        if steps and steps[-1] == settings["max_train_steps"]:
            break  # only the final files are left to write: a last, uninterrupted resume does that
    if outcomes[-1] != "finished":
        last = run_script(argv)
        assert last.returncode == 0, last.stderr[-3000:]
        outcomes.append("finished by a last resume")
    print("kill loop:", "; ".join(outcomes))
    assert sum(o.startswith("killed") for o in outcomes) >= 1
    diff = max_diff(final_vectors(out), final_vectors(uninterrupted))
    print(f"kill loop: max |diff| = {diff:.3g}")
    assert diff == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_embedding_then_resumes(tiny_pipeline, data, tmp_path, signum):
    out = str(tmp_path / "out")
    log = str(tmp_path / "run.log")
    settings = dict(COMMON, max_train_steps=100000, checkpointing_steps=0, save_steps=0)
    process = start(base_args(tiny_pipeline, data, out, **settings), log)
    wait_until(lambda: log_has(log, "loss="), process)  # a step has been taken
    process.send_signal(signum)
    process.wait(120)
    text = open(log, encoding="utf-8").read()
    assert process.returncode != 0 and "Traceback" not in text, text[-3000:]
    found = checkpoints.list_checkpoints(out)
    assert len(found) == 1, os.listdir(out)
    step, path = found[0]
    assert step >= 1 and f"stopped by signal at step {step}" in text
    tensors, state = checkpoints.load_checkpoint(path)
    saved = final_vectors(out, f"learned_embeds-steps-{step}.safetensors")
    assert np.array_equal(saved, tensors["vectors"])
    assert not os.path.exists(os.path.join(out, "learned_embeds.safetensors"))  # the run is not finished
    if signum == signal.SIGINT:
        return  # the same checkpoint as for SIGTERM: resuming it once (below) is enough
    resumed = run_script(base_args(tiny_pipeline, data, out, resume_from_checkpoint="latest",
                                   **dict(settings, max_train_steps=step + 1)))
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr[-3000:]


@pytest.mark.slow
def test_non_finite_stops_with_a_message_and_keeps_the_last_good_files(tiny_pipeline, data, tmp_path):
    """lr 1e30: step 1 gives finite (huge) vectors, saved; step 2's loss overflows to nan and stops the run."""
    out = str(tmp_path / "out")
    message = "loss became nan at step 2"
    settings = dict(COMMON, learning_rate=1e30, lr_scheduler="constant", lr_warmup_steps=0)
    result = run_script(base_args(tiny_pipeline, data, out, **settings))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("textual_inversion.py: error:") and message in last_line, result.stderr[-2000:]
    assert "--learning_rate" in last_line
    good = [s for s, _ in checkpoints.list_checkpoints(out)]
    assert good == [1]
    assert_everything_readable(out)
    for step in good:
        assert np.isfinite(final_vectors(out, f"learned_embeds-steps-{step}.safetensors")).all()
    assert not os.path.exists(os.path.join(out, "learned_embeds.safetensors"))


def test_full_pipeline_is_loadable_only_once_completely_moved_in(tmp_path, monkeypatch):
    """--save_as_full_pipeline moves several folders into output_dir; a crash between two of the moves
    must leave no model_index.json, so the half-replaced folder is not taken for a pipeline."""
    from textual_inversion_core import hf_layout

    def make(folder, version):
        for sub in ("text_encoder", "unet", "vae", "tokenizer"):
            os.makedirs(os.path.join(folder, sub))
            open(os.path.join(folder, sub, "weights"), "w").write(version)
        open(os.path.join(folder, "model_index.json"), "w").write(version)

    out, staging = str(tmp_path / "out"), str(tmp_path / "out" / ".tmp-pipeline")
    make(out, "old")
    make(staging, "new")
    real_rename, calls = os.rename, []

    def crash_on_third_move(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(hf_layout.os, "rename", crash_on_third_move)
    with pytest.raises(KeyboardInterrupt):
        hf_layout.move_into(staging, out)
    assert not os.path.exists(os.path.join(out, "model_index.json"))
    monkeypatch.setattr(hf_layout.os, "rename", real_rename)

    make(staging + "-2", "newer")  # the rerun (resume latest) writes the pipeline again
    hf_layout.move_into(staging + "-2", out)
    assert open(os.path.join(out, "model_index.json")).read() == "newer"
    assert all(open(os.path.join(out, s, "weights")).read() == "newer" for s in ("text_encoder", "unet", "vae"))
    assert not os.path.exists(staging + "-2")


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_keeps_earlier_files(tiny_pipeline, data, tmp_path):
    """A file-size limit of 1000 bytes (like a full disk: writes fail with an OSError) lets the embedding
    files of steps 1 and 2 through (3 vectors: a .bin of ~750 bytes, in the webui-safe legacy layout) and
    stops checkpoint-2, whose tensors (vectors and both AdamW moments, ~1.4 kB) do not fit."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    out = str(tmp_path / "out")
    settings = dict(COMMON, num_vectors=3, checkpointing_steps=2, save_steps=1, max_train_steps=4)
    # Under the limit every write elsewhere would be cut short too: no bytecode, caches in tmp_path.
    env = script_env(dict(PYTHONDONTWRITEBYTECODE="1", HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"),
                          HF_HOME=str(tmp_path / "hf"), TMPDIR=str(tmp_path)))
    result = subprocess.run([sys.executable, TORCH_SCRIPT] + base_args(tiny_pipeline, data, out, **settings),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("textual_inversion.py: error: cannot write") and "checkpoint-2" in last, last
    written = [f"learned_embeds-steps-{s}.{ext}" for s in (1, 2) for ext in ("bin", "safetensors")]
    assert sorted(os.listdir(out)) == sorted(written)  # no checkpoint, no temporary file left behind either
    assert_everything_readable(out)
    for step in (1, 2):
        assert final_vectors(out, f"learned_embeds-steps-{step}.safetensors").shape == (3, 32)


def test_atomic_writes_keep_the_usual_permissions(tmp_path):
    """Temporary files are private (0600/0700); the renamed results must be readable like any other file."""
    from textual_inversion_core import atomic

    old = os.umask(0o022)
    try:
        atomic.write_text(str(tmp_path / "file.txt"), "x")
        with atomic.atomic_dir(str(tmp_path / "folder")) as folder:
            open(os.path.join(folder, "inside"), "w").write("y")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "file.txt").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "folder").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "folder" / "inside").st_mode & 0o777 == 0o644


def test_next_checkpoint_save_removes_what_a_killed_save_left(tmp_path):
    out = str(tmp_path)
    os.makedirs(os.path.join(out, ".tmp-checkpoint-4-k1l2"))
    os.makedirs(os.path.join(out, ".old-checkpoint-2-x9"))
    open(os.path.join(out, ".tmp-learned_embeds-steps-4.bin-abc"), "wb").write(b"half")
    open(os.path.join(out, "my notes.txt"), "w").write("keep")
    tensors = {"vectors": np.zeros((1, 4), np.float32)}
    checkpoints.save_checkpoint(out, 2, tensors, {"seed": 0})
    checkpoints.save_checkpoint(out, 5, tensors, {"seed": 0})
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-5", "my notes.txt"]
