"""Model card and Hugging Face Hub upload (huggingface_hub is imported only when pushing)."""

import os

from . import atomic
from .embeddings import DIFFUSERS_SAFETENSORS, file_stem_for_token
from .errors import UserError

# Never uploaded: resumable state, logs, temporary files and intermediate embeddings.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".tmp-*", ".old-*", "learned_embeds-steps-*",
                 "**/.tmp-*", "*.lock"]


def resolve_repo_id(args):
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def preflight(args):
    """Before training: check that a push can succeed (logged in, hub reachable). Returns repo id."""
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise UserError("--push_to_hub needs huggingface_hub; pip install huggingface_hub") from err
    try:
        user = HfApi().whoami(token=args.hub_token)
    except Exception as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"--push_to_hub: cannot reach the Hub or not logged in ({first}); "
                        "run `hf auth login`, set HF_TOKEN, or drop --push_to_hub") from err
    repo_id = resolve_repo_id(args)
    if "/" not in repo_id and isinstance(user, dict) and user.get("name"):
        repo_id = f"{user['name']}/{repo_id}"
    return repo_id


def model_card(repo_id, base_model, token, learnable_property, num_vectors, images=(), export_formats=()):
    stem = file_stem_for_token(token)
    gallery = "\n".join(f"![sample {i}](./{p})" for i, p in enumerate(images))
    a1111 = (f"Copy `{stem}.pt` into the webui's `embeddings/` folder and write `{stem}` in a prompt."
             if "a1111" in export_formats else
             f"Load `{DIFFUSERS_SAFETENSORS}` through the webui's embedding loader.")
    return f"""---
license: creativeml-openrail-m
base_model: {base_model}
instance_prompt: {token}
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

Learned embedding ({num_vectors} vector{'s' if num_vectors != 1 else ''}) of the {learnable_property} `{token}`
for the text encoder of [{base_model}](https://huggingface.co/{base_model}).

## Use in diffusers

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
pipe.load_textual_inversion("{repo_id}")
image = pipe("a photo of {token} on a beach").images[0]
```

## Use in AUTOMATIC1111 / ComfyUI

{a1111}

{gallery}
"""


def write_model_card(output_dir, repo_id, args, images=()):
    text = model_card(repo_id, args.pretrained_model_name_or_path, args.placeholder_token, args.learnable_property,
                      args.num_vectors, images=images, export_formats=args.export_formats)
    path = os.path.join(output_dir, "README.md")
    atomic.write_text(path, text)
    return path


def upload(output_dir, repo_id, token=None, message="End of training"):
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=message, token=token,
                  ignore_patterns=UPLOAD_IGNORE)
    return repo_id
