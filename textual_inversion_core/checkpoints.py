"""Resumable checkpoints: naming, atomic saving, rotation and lookup.

A checkpoint holds only what training changes: the learned vectors, the AdamW moments and a small
JSON state (step, seed, ...). Both trainers use the same layout, tensors in safetensors (no pickle):

    output_dir/checkpoint-N/training_state.safetensors
    output_dir/checkpoint-N/training_state.json

Folders are written under a temporary name and renamed, so a checkpoint-N folder is always complete.
"""

import json
import os
import re
import shutil
import time

import numpy as np

from . import atomic
from .errors import UserError

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step):
    return f"checkpoint-{int(step)}"


def list_checkpoints(output_dir):
    """[(step, path)] of complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir, spec):
    """Path of the checkpoint named by --resume_from_checkpoint, or None for 'latest' with none saved."""
    if spec is None:
        return None
    if spec == "latest":
        found = [(s, p) for s, p in list_checkpoints(output_dir) if os.path.isfile(os.path.join(p, STATE_JSON))]
        return found[-1][1] if found else None
    candidates = [spec, os.path.join(output_dir, spec), os.path.join(output_dir, os.path.basename(spec.rstrip("/")))]
    for path in candidates:
        if os.path.isdir(path):
            return path
    available = ", ".join(os.path.basename(p) for _, p in list_checkpoints(output_dir)) or "none"
    raise UserError(f"--resume_from_checkpoint {spec!r} not found in {output_dir!r} (available: {available}); "
                    "name an existing checkpoint-N or use latest")


def save_checkpoint(output_dir, step, tensors, state, total_limit=None):
    """Atomically write checkpoint-<step>, then delete the oldest beyond total_limit. Returns its path."""
    from safetensors.numpy import save

    final = os.path.join(output_dir, checkpoint_name(step))
    payload = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    remove_crash_leftovers(output_dir)
    with atomic.atomic_dir(final) as tmp:
        with open(os.path.join(tmp, STATE_TENSORS), "wb") as f:
            f.write(save(payload))
        with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:
            json.dump(dict(state, step=int(step)), f, indent=2, sort_keys=True)
        _test_pause_before_rename(step)
    if total_limit is not None:
        rotate_checkpoints(output_dir, total_limit)
    return final


def remove_crash_leftovers(output_dir):
    """Delete the temporary checkpoint folders and embedding files that a killed run left behind."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if name.startswith((".tmp-checkpoint-", ".old-checkpoint-")):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".tmp-learned_embeds") and os.path.isfile(path):
                os.unlink(path)


def _test_pause_before_rename(step):
    """Fault-injection hook for the crash tests, inert unless TEXTUAL_INVERSION_TEST_SAVE_PAUSE is set.

    "STEP:SECONDS" sleeps while checkpoint-STEP sits complete in its temporary folder, not yet
    renamed, so a test can kill -9 the process at exactly that moment.
    """
    hook = os.environ.get("TEXTUAL_INVERSION_TEST_SAVE_PAUSE")
    if hook and int(hook.split(":")[0]) == int(step):
        time.sleep(float(hook.split(":")[1]))


def rotate_checkpoints(output_dir, total_limit):
    """Keep the newest total_limit checkpoints; return the removed paths."""
    found = list_checkpoints(output_dir)
    removed = []
    for _, path in found[: max(0, len(found) - total_limit)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def load_checkpoint(path):
    """(tensors, state) of a checkpoint folder; a missing or damaged file is a UserError."""
    from safetensors.numpy import load_file

    json_path, tensor_path = os.path.join(path, STATE_JSON), os.path.join(path, STATE_TENSORS)
    if not (os.path.isfile(json_path) and os.path.isfile(tensor_path)):
        raise UserError(f"checkpoint {path!r} is incomplete (no {STATE_JSON} / {STATE_TENSORS}); "
                        "resume from another checkpoint-N or delete this folder")
    try:
        with open(json_path, encoding="utf-8") as f:
            state = json.load(f)
        tensors = load_file(tensor_path)
    except Exception as err:
        raise UserError(f"checkpoint {path!r} is corrupt ({str(err).splitlines()[0][:200]}); "
                        "resume from an older checkpoint-N or delete this folder") from err
    return tensors, state
