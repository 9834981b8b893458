"""Model card and Hugging Face Hub upload (huggingface_hub is imported only when pushing)."""

import json
import os

from . import atomic, families, plots
from .best import best_note
from .embeddings import DIFFUSERS_SAFETENSORS, file_stem_for_token, is_local_model, public_model_name
from .errors import UserError

# Never uploaded: resumable state, logs, temporary files and intermediate embeddings.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".tmp-*", ".old-*", "learned_embeds-steps-*",
                 "learned_embeds_2-steps-*", "learned_embeds_3-steps-*", "**/.tmp-*", "*.lock"]


def resolve_repo_id(args):
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def preflight(args):
    """Before training: check that a push can succeed (online, logged in, hub reachable). Returns repo id."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError("--push_to_hub cannot work with HF_HUB_OFFLINE set; unset HF_HUB_OFFLINE or drop --push_to_hub")
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise UserError("--push_to_hub needs huggingface_hub; pip install huggingface_hub") from err
    try:
        user = HfApi().whoami(token=args.hub_token)
    except Exception as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if args.hub_token:
            first = first.replace(args.hub_token, "***")
        raise UserError(f"--push_to_hub: cannot reach the Hub or not logged in ({first}); "
                        "run `hf auth login`, set HF_TOKEN, or drop --push_to_hub") from err
    repo_id = resolve_repo_id(args)
    if "/" not in repo_id and isinstance(user, dict) and user.get("name"):
        repo_id = f"{user['name']}/{repo_id}"
    return repo_id


def _base_model_parts(base_model, base_model_on_hub):
    """(YAML line, text naming the base model, the string to load it with) of a model card."""
    if base_model_on_hub:
        return (f"base_model: {json.dumps(str(base_model))}\n", f"[{base_model}](https://huggingface.co/{base_model})",
                json.dumps(str(base_model)))
    return "", f"the local model `{base_model}`", json.dumps(f"path/to/{base_model}")


def model_card(repo_id, base_model, token, learnable_property, num_vectors, images=(), export_formats=(),
               base_model_on_hub=True, sdxl=False, safe_serialization=True, family=None, trained=None):
    """README.md for the Hub repo: YAML metadata, then how to use the embedding in each tool.

    base_model: the hub id (linked, and declared in the metadata), or with base_model_on_hub=False the local
    model folder's name, never its path. sdxl: the embedding is SDXL's two files (see sdxl_model_card). family:
    the model's family; SD3 and Flux.1 get flow_model_card, with trained: the trained EncoderSpecs."""
    spec = families.get(family) if family else None
    if spec is not None and spec.tagged_files:
        return flow_model_card(repo_id, base_model, token, learnable_property, num_vectors, spec,
                               trained or families.trained_encoders(spec), images, export_formats, base_model_on_hub,
                               safe_serialization)
    if sdxl:
        return sdxl_model_card(repo_id, base_model, token, learnable_property, num_vectors, images, export_formats,
                               base_model_on_hub, safe_serialization)
    stem = file_stem_for_token(token)
    base_model_yaml, base_model_text, load_base = _base_model_parts(base_model, base_model_on_hub)
    gallery = "\n".join(f"![sample {i}](./{p})" for i, p in enumerate(images))
    if "a1111" in export_formats:
        a1111 = (f"Download `{stem}.pt` into the webui's `embeddings/` folder and write `{stem}` in a prompt "
                 "(the webui takes the trigger word from the file name, so keep the name or rename the file "
                 "to the word you want).")
    else:
        a1111 = (f"Convert the embedding first: `python -m textual_inversion_core.convert {DIFFUSERS_SAFETENSORS} "
                 f"{stem}.pt`, then copy `{stem}.pt` into the webui's `embeddings/` folder and write `{stem}` in a prompt.")
    if "kohya" in export_formats:
        comfy = (f"Copy `{stem}.safetensors` into `ComfyUI/models/embeddings/` and write `embedding:{stem}` in the prompt. "
                 "kohya's scripts read the same file.")
    else:
        comfy = (f"Copy `{DIFFUSERS_SAFETENSORS}` into `ComfyUI/models/embeddings/`, rename it to `{stem}.safetensors` "
                 f"and write `embedding:{stem}` in the prompt.")
    plural = "s" if num_vectors != 1 else ""
    return f"""---
license: creativeml-openrail-m
{base_model_yaml}instance_prompt: {json.dumps(token)}
tags:
- stable-diffusion
- stable-diffusion-diffusers
- text-to-image
- diffusers
- textual_inversion
- diffusers-training
inference: true
---

# Textual Inversion: {token}

Learned embedding ({num_vectors} vector{plural}) of the {learnable_property} `{token}`
for the text encoder of {base_model_text}.

## Use in diffusers

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({load_base})
pipe.load_textual_inversion("{repo_id}")
image = pipe("a photo of {token} on a beach").images[0]
```

## Use in AUTOMATIC1111 webui

{a1111}

## Use in ComfyUI

{comfy}

## Files

- `{DIFFUSERS_SAFETENSORS}` / `learned_embeds.bin`: diffusers format, `{{"{token}": float32[{num_vectors}, dim]}}`
- `token_identifier.txt`, `type_of_concept.txt`: the token and the kind of concept

{gallery}
"""


def sdxl_model_card(repo_id, base_model, token, learnable_property, num_vectors, images=(), export_formats=(),
                    base_model_on_hub=True, safe_serialization=True):
    """model_card for an SDXL embedding: diffusers loads each of the two files into its own text encoder and
    tokenizer; the webui and ComfyUI take the one {clip_l, clip_g} file."""
    stem = file_stem_for_token(token)
    base_model_yaml, base_model_text, load_base = _base_model_parts(base_model, base_model_on_hub)
    gallery = "\n".join(f"![sample {i}](./{p})" for i, p in enumerate(images))
    ext = "safetensors" if safe_serialization else "bin"
    first, second = f"learned_embeds.{ext}", f"learned_embeds_2.{ext}"
    if {"a1111", "kohya"} & set(export_formats):
        get_file = f"Download `{stem}.safetensors`"
    else:
        get_file = (f"Make the file first: `python -m textual_inversion_core.convert {first} {stem}.safetensors` "
                    f"(it reads `{second}` beside it), then take `{stem}.safetensors`")
    webui_file = f"`{stem}.safetensors`: webui/ComfyUI SDXL layout, `{{\"clip_l\": float32[{num_vectors}, dim], " \
                 f"\"clip_g\": float32[{num_vectors}, dim_2]}}`\n" if {"a1111", "kohya"} & set(export_formats) else ""
    plural = "s" if num_vectors != 1 else ""
    return f"""---
license: openrail++
{base_model_yaml}instance_prompt: {json.dumps(token)}
tags:
- stable-diffusion-xl
- stable-diffusion-xl-diffusers
- text-to-image
- diffusers
- textual_inversion
- diffusers-training
inference: true
---

# Textual Inversion (SDXL): {token}

Learned embedding ({num_vectors} vector{plural} for each of the two text encoders) of the {learnable_property}
`{token}` for Stable Diffusion XL, {base_model_text}.

## Use in diffusers

Each file goes into its own text encoder and tokenizer:

```python
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained({load_base})
pipe.load_textual_inversion("{repo_id}", weight_name="{first}", token="{token}",
                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion("{repo_id}", weight_name="{second}", token="{token}",
                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
image = pipe("a photo of {token} on a beach").images[0]
```

## Use in AUTOMATIC1111 webui

{get_file} into the webui's `embeddings/` folder and write `{stem}` in a prompt (the webui takes the trigger word
from the file name); this one file holds the vectors of both text encoders.

## Use in ComfyUI

{get_file} into `ComfyUI/models/embeddings/` and write `embedding:{stem}` in the prompt. kohya's SDXL scripts read
the same file.

## Files

- `{first}`: diffusers format for `text_encoder` (CLIP ViT-L), `{{"{token}": float32[{num_vectors}, dim]}}`
- `{second}`: the same for `text_encoder_2` (OpenCLIP ViT-bigG), `{{"{token}": float32[{num_vectors}, dim_2]}}`
{webui_file}- `token_identifier.txt`, `type_of_concept.txt`: the token and the kind of concept

{gallery}
"""


def flow_model_card(repo_id, base_model, token, learnable_property, num_vectors, spec, trained, images=(),
                    export_formats=(), base_model_on_hub=True, safe_serialization=True):
    """model_card for an SD3 or Flux.1 embedding: load_embedding_into_pipeline puts every part into its encoder
    (StableDiffusion3Pipeline has no textual-inversion loader); ComfyUI and OneTrainer take the one file."""
    stem = file_stem_for_token(token)
    base_model_yaml, base_model_text, load_base = _base_model_parts(base_model, base_model_on_hub)
    gallery = "\n".join(f"![sample {i}](./{p})" for i, p in enumerate(images))
    ext = "safetensors" if safe_serialization else "bin"
    one_file = bool({"a1111", "kohya"} & set(export_formats))
    keys = [e.file_key for e in trained] + (["t5"] if any(e.kind == "t5" for e in trained) else [])
    multi = num_vectors > 1 and spec is families.SD3
    trigger = " ".join([token] + [f"{token}_{i}" for i in range(1, num_vectors)]) if multi else token
    files = "".join(f"- `{e.diffusers_stem}.{ext}`: diffusers format for `{e.subfolder}`, "
                    f"`{{\"{token}\": float32[{num_vectors}, dim]}}`\n" for e in trained)
    if one_file:
        files += f"- `{stem}.safetensors`: every part in one file, keys {', '.join(f'`{k}`' for k in keys)}\n"
        clients = (f"**ComfyUI**: copy `{stem}.safetensors` into `ComfyUI/models/embeddings/` and write `embedding:{stem}` "
                   "in the prompt (it reads `clip_l`, `clip_g`, `t5xxl`). **OneTrainer** reads the same file "
                   "(`clip_l`, `clip_g`, `t5`). AUTOMATIC1111 / Forge apply its CLIP parts only.")
    else:
        clients = (f"Make the one file first: `python -m textual_inversion_core.convert learned_embeds.{ext} "
                   f"{stem}.safetensors`, then copy it into `ComfyUI/models/embeddings/` and write `embedding:{stem}`.")
    t5_note = "" if any(e.kind == "t5" for e in trained) else " (CLIP encoders only; T5 was not trained)"
    plain = ""
    if spec is families.FLUX:
        plain = "\nOr with diffusers alone, one call per file (the T5 part goes into `text_encoder_2`):\n\n```python\n" + "".join(
            f'pipe.load_textual_inversion("{repo_id}", weight_name="{e.diffusers_stem}.{ext}", token="{token}",\n'
            f"                            text_encoder=pipe.{e.subfolder}, tokenizer=pipe.{e.tokenizer})\n"
            for e in trained) + "```\n"
    plural = "s" if num_vectors != 1 else ""
    encoders = ", ".join(e.subfolder for e in trained)
    return f"""---
{base_model_yaml}instance_prompt: {json.dumps(token)}
tags:
- {"stable-diffusion-3" if spec is families.SD3 else "flux"}
- text-to-image
- diffusers
- textual_inversion
- diffusers-training
inference: false
---

# Textual Inversion ({spec.label}): {token}

Learned embedding ({num_vectors} vector{plural} for each trained text encoder: {encoders}{t5_note}) of the
{learnable_property} `{token}` for {spec.label}, {base_model_text}.

## Use in diffusers

`load_embedding_into_pipeline` (from this trainer's `textual_inversion_core`) puts every part into its own text
encoder and tokenizer{" (diffusers' StableDiffusion3Pipeline has no textual-inversion loader)" if spec is families.SD3 else ""}:

```python
from diffusers import {spec.pipeline_class}
from huggingface_hub import snapshot_download
from textual_inversion_core.pipeline_loading import load_embedding_into_pipeline

pipe = {spec.pipeline_class}.from_pretrained({load_base})
trigger = load_embedding_into_pipeline(pipe, snapshot_download("{repo_id}"))  # "{trigger}"
image = pipe(f"a photo of {{trigger}} on a beach").images[0]
```
{plain}
## Use in ComfyUI and OneTrainer

{clients}

## Files

{files}- `token_identifier.txt`, `type_of_concept.txt`: the token and the kind of concept

{gallery}
"""


def write_model_card(output_dir, repo_id, args, images=(), sdxl=False, family=None):
    model = args.pretrained_model_name_or_path
    spec = families.get(family) if family else None
    trained = families.trained_encoders(spec, getattr(args, "enable_t5_ti", False)) if spec else None
    text = model_card(repo_id, public_model_name(model), args.placeholder_token, args.learnable_property,
                      args.num_vectors, images=images, export_formats=args.export_formats,
                      base_model_on_hub=not is_local_model(model), sdxl=sdxl,
                      safe_serialization=not getattr(args, "no_safe_serialization", False), family=family,
                      trained=trained)
    note = best_note(output_dir)  # --select_best: which step, by which rule, and why
    if note:
        text = text.rstrip("\n") + f"\n\n## Best step\n\n{note}\n"
    path = os.path.join(output_dir, "README.md")
    atomic.write_text(path, text)
    return path


def upload(output_dir, repo_id, token=None, message="End of training", logging_dir=None):
    """Create the repo if needed and upload output_dir without checkpoints, logs or temporary files."""
    from huggingface_hub import create_repo, upload_folder

    ignore = list(UPLOAD_IGNORE)
    if logging_dir and not os.path.isabs(logging_dir) and logging_dir.strip("./"):
        # A custom --logging_dir inside output_dir holds TensorBoard events: never published.
        ignore += [f"{logging_dir.strip('/')}/**"]
    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=message, token=token,
                  ignore_patterns=ignore)
    return repo_id


def publish(args, repo_id, sdxl=False, family=None):
    """End of a --push_to_hub run: model card showing the newest validation images, then the upload.
    sdxl: the run learned SDXL's two vector sets (the card shows how to load both files); family: the model's
    family (SD3 / Flux.1 cards show load_embedding_into_pipeline)."""
    by_step = plots.validation_images_by_step(os.path.join(args.output_dir, "validation"))
    samples = [os.path.relpath(p, args.output_dir) for paths in by_step.values() for p in paths]
    write_model_card(args.output_dir, repo_id, args, images=samples[-4:], sdxl=sdxl, family=family)
    return upload(args.output_dir, repo_id, token=args.hub_token, logging_dir=args.logging_dir)
