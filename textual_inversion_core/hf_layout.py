"""Folder-layout fixes for saved pipelines (torch and safetensors are imported only when called)."""

import os
import shutil


def add_text_model_prefix(folder):
    """Rewrite a CLIPTextModel's model.safetensors so every key starts with `text_model.` (but SDXL's
    `text_projection.`).

    transformers 5 saves CLIPTextModel without that prefix; transformers 4.x (and its Flax
    from_pt conversion) then silently keeps random weights. Both versions load the prefixed layout.
    """
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        return
    state = load_file(path)
    # SDXL's CLIPTextModelWithProjection keeps its projection beside text_model: that key takes no prefix.
    outside = ("text_model.", "text_projection.")
    if all(k.startswith(outside) for k in state):
        return
    renamed = {(k if k.startswith(outside) else "text_model." + k): v.contiguous() for k, v in state.items()}
    tmp = path + ".tmp"
    save_file(renamed, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def move_into(staging, destination):
    """Move every entry of staging into destination (replacing same-named ones), then drop staging.

    model_index.json, which makes a folder loadable as a pipeline, is removed first and moved in last:
    a crash half-way leaves a folder that cannot be mistaken for a complete pipeline.
    """
    os.makedirs(destination, exist_ok=True)
    marker = "model_index.json"
    if os.path.exists(os.path.join(staging, marker)) and os.path.exists(os.path.join(destination, marker)):
        os.unlink(os.path.join(destination, marker))
    for name in sorted(os.listdir(staging), key=lambda entry: entry == marker):
        target = os.path.join(destination, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.unlink(target)
        os.rename(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)
