"""Helpers of both test suites: tests/ (PyTorch trainer, run in .venv) and tests/flax/ (run in .venv-flax).

Command lines for the tiny pipeline, running a trainer as users do (a subprocess), reading learned
vectors, the training images and the session fixtures both suites use. Only the standard library,
numpy and pytest are imported at module level, so this loads in either environment.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TORCH_SCRIPT = os.path.join(REPO, "textual_inversion.py")
FLAX_SCRIPT = os.path.join(REPO, "textual_inversion_flax.py")
# The PyTorch environment (transformers 5, diffusers 0.4x): the Flax suite checks its outputs load there.
TORCH_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
PLACEHOLDER = "<cat-toy>"

# Fast runs on the tiny pipeline. The suites' own defaults are what their assertions are written
# against (e.g. the Flax checkpoints' seed 7 and 2 vectors).
TORCH_DEFAULTS = {
    "placeholder_token": PLACEHOLDER, "initializer_token": "toy", "resolution": 64, "train_batch_size": 2,
    "max_train_steps": 6, "learning_rate": 5e-3, "lr_warmup_steps": 0, "seed": 1234, "report_to": "none",
    "checkpointing_steps": 0, "save_steps": 0,
}
FLAX_DEFAULTS = {
    "placeholder_token": PLACEHOLDER, "initializer_token": "toy", "resolution": 64, "train_batch_size": 1,
    "max_train_steps": 4, "learning_rate": 5e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0, "seed": 7,
    "num_vectors": 2, "save_steps": 0, "checkpointing_steps": 0, "report_to": "none",
}


FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7

# PyTorch and Flax compute the same networks with other kernels (convolution algorithms, attention, GELU): the float32
# gradients of the vectors differ by up to 440 eps of the gradient's norm (relative 3.8e-5 on the tiny pipeline, 5.2e-5
# on tiny SDXL, alike with AVX-512 and AVX2 kernels). 2048 eps (2.4e-4) leaves 4.7x headroom; a real mismatch (the
# other prediction type, a missing scale, the other encoder's vectors) changes the gradient by far more.
FRAMEWORK_GRADIENT_PARITY = 2048 * FLOAT32_EPS


def assert_within_eps(actual, expected, eps_count, scale=None, what=""):
    """Two float32 results of different computations (other kernels, batch sizes, thread counts, CPUs) agree:
    max |actual - expected| <= eps_count * float32 eps * scale, scale by default the L2 norm of expected.

    Rounding in a sum grows with the size of its terms, not of each result element (an element near 0 can
    have any relative error), so the bound is set from the values' scale, never a fixed 1e-10.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.linalg.norm(expected)) if scale is None else float(scale)
    difference = float(np.abs(actual - expected).max())
    bound = eps_count * FLOAT32_EPS * scale
    assert difference <= bound, (f"{what}: max difference {difference:.3g} = {difference / (FLOAT32_EPS * scale):.3g} "
                                 f"eps x scale {scale:.3g}; allowed {eps_count} eps x scale = {bound:.3g}")


def base_args(pipeline, data_dir, output_dir, defaults=TORCH_DEFAULTS, **overrides):
    """A command line for the tiny pipeline: --flag=value items; overrides use flag names without
    dashes, True gives a bare --flag, None or False drops the flag."""
    options = {"pretrained_model_name_or_path": pipeline, "train_data_dir": data_dir, "output_dir": output_dir,
               **defaults, **overrides}
    argv = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}" if value is True else f"--{key}={value}")
    return argv


def flax_base_args(pipeline, data_dir, output_dir, **overrides):
    return base_args(pipeline, data_dir, output_dir, defaults=FLAX_DEFAULTS, **overrides)


def script_env(extra=None):
    """The environment of a trainer subprocess: this one's, offline and unbuffered, plus extra."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # Inherited from a launcher around pytest, it would make every run one rank of a job (Flax refuses it).
    env.pop("LOCAL_RANK", None)
    env.update(extra or {})
    return env


def run_script(argv, script=TORCH_SCRIPT, python=sys.executable, env=None, launcher=None, timeout=600,
               check=False):
    """Run a trainer as users do (a subprocess in the repo root); returns the CompletedProcess, text output.

    launcher replaces the interpreter (e.g. [accelerate, "launch", ...]); check=True fails unless it exits with 0.
    """
    command = (launcher or [python]) + [script] + [str(a) for a in argv]
    result = subprocess.run(command, cwd=REPO, env=script_env(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{os.path.basename(script)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def run_in_process(argv, script=TORCH_SCRIPT, cache=None):
    """run_script's result (a CompletedProcess: exit code, stderr with the logs, warnings and progress bars) from
    the trainer's main() in this process, as its command line calls it (run_cli).

    A subprocess imports torch or jax, diffusers and transformers again (several seconds of the 2-core CI machine per
    run): tests about what a run writes or computes use this; tests about the command line, the script's exit codes,
    signals or several processes keep run_script. One process: the PyTorch trainers on CPU, or the Flax trainer on
    this process's devices (1 unless XLA_FLAGS says otherwise) with `cache` as the persistent XLA cache.
    """
    import contextlib
    import io
    import logging
    import traceback
    import warnings

    from textual_inversion_core.errors import run_cli

    argv = [str(a) for a in argv]
    prog = os.path.basename(script)
    if script == FLAX_SCRIPT:
        import jax

        import textual_inversion_flax

        if cache:
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

        def main():
            return textual_inversion_flax.main(argv)
    else:
        assert script in (TORCH_SCRIPT, os.path.join(REPO, "textual_inversion_sdxl.py")), script
        from accelerate.state import AcceleratorState, GradientState

        import textual_inversion

        # A fresh process has no accelerate state; a run with another --mixed_precision would refuse the one left here.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

        def main():
            return textual_inversion.main(argv, prog=prog)
    stderr, stdout = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)  # what logging.basicConfig gives a fresh process (pytest's root has handlers)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, saved = logging.getLogger(), (logging.getLogger().level, sys.argv, warnings.formatwarning)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sys.argv = [script] + argv
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), warnings.catch_warnings():
            # A fresh interpreter's filters, printing to stderr (pytest would record them instead)
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                code = run_cli(lambda _: main()) or 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:
                traceback.print_exc(file=stderr)
                code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        sys.argv, warnings.formatwarning = saved[1], saved[2]
    return subprocess.CompletedProcess([sys.executable, script] + argv, code, stdout.getvalue(), stderr.getvalue())


def run_flax_in_process(argv, cache=None):
    """run_flax(argv, devices=1, cache) without a new interpreter (run_in_process): fails unless the run ends with 0."""
    import jax

    assert jax.device_count() == 1, "this process has several JAX devices: use run_flax(..., devices=1)"
    result = run_in_process(argv, FLAX_SCRIPT, cache=cache)
    if result.returncode != 0:
        raise AssertionError(f"textual_inversion_flax.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def jax_env(devices=1, cache=None):
    """Variables that give a Flax trainer `devices` CPU devices and, with cache, a persistent XLA cache
    shared by every run of the session (identical steps compile once)."""
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run_flax(argv, devices=1, cache=None, timeout=600, check=True):
    """run_script for textual_inversion_flax.py on `devices` forced CPU devices; fails unless it exits with 0."""
    return run_script(argv, FLAX_SCRIPT, env=jax_env(devices, cache), timeout=timeout, check=check)


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid):
    """Process ids of pid's children, grandchildren, ... (Linux /proc)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_hosts(commands, envs, log_dir, timeout):
    """Start one process per host (commands[i] with script_env(envs[i])), logging to log_dir/host{i}.log;
    returns [(exit code, log text)]. A host still running after `timeout` seconds is killed and fails the test:
    one host stopping alone leaves the others waiting for it, which must not block CI."""
    procs, logs = [], [os.path.join(str(log_dir), f"host{i}.log") for i in range(len(commands))]
    for command, env, log_path in zip(commands, envs, logs):
        # Logs to files, not pipes: a full pipe would stall one host and with it the others.
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen([str(c) for c in command], cwd=REPO, env=script_env(env),
                                          stdout=subprocess.DEVNULL, stderr=log))
    deadline = time.monotonic() + timeout
    try:
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for proc in procs:  # with the launcher's workers (torch's launcher starts each in a session of its own)
            if proc.poll() is None:
                for pid in [proc.pid] + descendants(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
    results = [(code, open(path, encoding="utf-8", errors="replace").read()) for code, path in zip(codes, logs)]
    hung = [i for i, (code, _) in enumerate(results) if code is None]
    assert not hung, f"host(s) {hung} still running after {timeout} s:\n" + "\n".join(
        f"--- host {i}:\n{text[-2500:]}" for i, (_, text) in enumerate(results))
    return results


def run_torch_python(code, *args, timeout=300):
    """Run code in the PyTorch environment (.venv); returns its JSON on the last stdout line."""
    proc = subprocess.run([TORCH_PYTHON, "-c", code] + [str(a) for a in args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torch-env check failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_line_error(call, *args, **kwargs):
    """The message of the UserError call(*args, **kwargs) raises, checked to be one non-empty line."""
    from textual_inversion_core.errors import UserError

    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def read_vectors(path, token=PLACEHOLDER):
    """The learned vectors (numpy) of an embedding file, which must hold `token` and nothing else."""
    from safetensors.numpy import load_file

    data = load_file(path)
    assert list(data) == [token], (path, list(data))
    return data[token]


def write_images(folder, count=4, size=(80, 96), seed=0):
    """count PNG pictures of size (height, width) in folder; returns the folder as a string."""
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


# Session fixtures of both suites; each conftest.py imports them so that pytest finds them.


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the PyTorch trainer gets as far as loading a model (a refusal must come before)."""
    from torch_backend.families.base import Family

    def refuse(self, *args):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(Family, "load_text_encoder", refuse)
    monkeypatch.setattr(Family, "load_image_side", refuse)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A random-weight tiny SD pipeline folder with the real CLIP vocabulary (built once per session)."""
    from tools.make_tiny_pipeline import make_pipeline

    return make_pipeline(str(tmp_path_factory.mktemp("pipelines") / "tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory):
    """A random-weight tiny SDXL pipeline folder: text_encoder 32 wide, text_encoder_2 48 wide (built once per session)."""
    from tools.make_tiny_pipeline import make_pipeline

    return make_pipeline(str(tmp_path_factory.mktemp("pipelines") / "tiny-sdxl"), size="tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory):
    """A random-weight tiny SD3 pipeline folder: CLIP-L 32, CLIP-G 48 and T5 96 wide (built once per session)."""
    from tools.make_tiny_pipeline import make_pipeline

    return make_pipeline(str(tmp_path_factory.mktemp("pipelines") / "tiny-sd3"), size="tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory):
    """A random-weight tiny Flux.1 pipeline folder with the guidance embedding: CLIP-L 32 and T5 64 wide
    (built once per session)."""
    from tools.make_tiny_pipeline import make_pipeline

    return make_pipeline(str(tmp_path_factory.mktemp("pipelines") / "tiny-flux"), size="tiny-flux", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random-weight tiny CLIPModel folder with its processor (--eval_clip_model in tests; built once per session)."""
    from tools.make_tiny_pipeline import make_tiny_clip

    return make_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "images")
