"""Helpers of the Flax tests: run the trainer in a subprocess with N forced CPU devices, run code
in the PyTorch environment, read outputs."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "textual_inversion_flax.py")
TORCH_SCRIPT = os.path.join(REPO, "textual_inversion.py")
# The PyTorch environment (transformers 5, diffusers 0.4x), relative to the repo root.
TORCH_PYTHON = os.path.join(REPO, ".venv", "bin", "python")

if REPO not in sys.path:
    sys.path.insert(0, REPO)


def run_trainer(args, devices=1, cache=None, timeout=600, check=True):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("LOCAL_RANK", None)
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    proc = subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def base_args(pipeline, images, output_dir, **overrides):
    flags = {"pretrained_model_name_or_path": pipeline, "train_data_dir": images, "placeholder_token": "<cat-toy>",
             "initializer_token": "toy", "resolution": 64, "train_batch_size": 1, "max_train_steps": 4,
             "learning_rate": 5e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0, "output_dir": output_dir,
             "seed": 7, "num_vectors": 2, "save_steps": 0, "checkpointing_steps": 0, "report_to": "none"}
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def read_vectors(path):
    from safetensors.numpy import load_file

    (token, vectors), = load_file(path).items()
    return token, vectors


def run_torch_python(code, *args, timeout=300):
    """Run code in the PyTorch environment (.venv); returns its JSON on the last stdout line."""
    proc = subprocess.run([TORCH_PYTHON, "-c", code] + [str(a) for a in args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torch-env check failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
