"""A base model's small files (model_index.json, a part's config.json, a weights file's path) read before any model
loads, from a local pipeline folder or from the Hub cache. Nothing is downloaded: None means "not on this machine
yet", and the trainer checks the same thing again once diffusers has fetched the model."""

import json
import os


def local_file(name_or_path, filename, revision=None):
    """The path of filename ("scheduler/scheduler_config.json") inside the pipeline name_or_path, a folder (diffusers'
    rule: a path that exists) or a hub id whose file is in the Hub cache; None when it is not on this machine."""
    name = str(name_or_path)
    if os.path.exists(name):
        path = os.path.join(name, *filename.split("/"))
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(name, filename, revision=revision)
        except Exception:  # not a repo id, no cache, no huggingface_hub
            return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def read_json(name_or_path, filename, revision=None):
    """The JSON object of local_file(...) as a dict; None when the file is not here or is not a JSON object."""
    path = local_file(name_or_path, filename, revision)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
