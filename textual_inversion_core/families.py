"""The model families the trainers know, in one table: which text encoders each has, their tokenizers, the keys of
their vectors in files, and whether the family trains with flow matching. Framework-free; nothing here loads a model.

A family is told from the pipeline's model_index.json (a local folder or the Hub cache) by its `_class_name`, with
the components it lists as the fallback, so that a renamed or custom pipeline class still finds its family.
"""

import dataclasses
import os
from typing import Optional, Tuple

from . import model_files


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a pipeline.

    subfolder, tokenizer: the pipeline's folders of the encoder and of its tokenizer; file_key: the key of its
    vectors in the one-file embedding (ComfyUI's names: clip_l, clip_g, t5xxl); diffusers_stem: the name of its
    diffusers file (learned_embeds, learned_embeds_2, learned_embeds_3 by the encoder's place in the pipeline, as
    diffusers' SDXL script names its pair); kind: "clip" or "t5"."""

    subfolder: str
    tokenizer: str
    file_key: str
    diffusers_stem: str
    kind: str


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """A model family. encoders: every text encoder of the pipeline, in the pipeline's order; flow_matching: trained
    with the flow-matching loss (else DDPM noise prediction); pipeline_class: diffusers' pipeline class name;
    denoiser: the pipeline's folder of the denoising network; label: the name users know; flax: whether diffusers
    has Flax models for it; tagged_files: its embedding files name the family and the encoder in their metadata
    (learned_embeds_2 is CLIP-G in SD3 but T5 in Flux.1); SD/SDXL files keep the layout clients have read for years."""

    name: str
    encoders: Tuple[EncoderSpec, ...]
    flow_matching: bool
    pipeline_class: str
    denoiser: str
    label: str
    flax: bool
    tagged_files: bool = False

    @property
    def file_keys(self):
        return tuple(e.file_key for e in self.encoders)

    def encoder(self, file_key):
        """The EncoderSpec of file_key (clip_l, clip_g, t5xxl); KeyError if the family has none."""
        for spec in self.encoders:
            if spec.file_key == file_key:
                return spec
        raise KeyError(f"{self.label} has no {file_key} text encoder")

    @property
    def has_t5(self):
        return any(e.kind == "t5" for e in self.encoders)


def _encoder(place, file_key, kind):
    suffix = "" if place == 1 else f"_{place}"
    return EncoderSpec(subfolder=f"text_encoder{suffix}", tokenizer=f"tokenizer{suffix}", file_key=file_key,
                       diffusers_stem=f"learned_embeds{suffix}", kind=kind)


SD = FamilySpec("sd", (_encoder(1, "clip_l", "clip"),), flow_matching=False,
                pipeline_class="StableDiffusionPipeline", denoiser="unet", label="SD-1.x/2.x", flax=True)
SDXL = FamilySpec("sdxl", (_encoder(1, "clip_l", "clip"), _encoder(2, "clip_g", "clip")), flow_matching=False,
                  pipeline_class="StableDiffusionXLPipeline", denoiser="unet", label="SDXL", flax=True)
# SD3/SD3.5: CLIP-L and OpenCLIP bigG (both with projection), then T5-XXL.
SD3 = FamilySpec("sd3", (_encoder(1, "clip_l", "clip"), _encoder(2, "clip_g", "clip"), _encoder(3, "t5xxl", "t5")),
                 flow_matching=True, pipeline_class="StableDiffusion3Pipeline", denoiser="transformer", label="SD3",
                 flax=False, tagged_files=True)
# Flux.1: CLIP-L (its pooled output only) and T5-XXL (the sequence).
FLUX = FamilySpec("flux", (_encoder(1, "clip_l", "clip"), _encoder(2, "t5xxl", "t5")), flow_matching=True,
                  pipeline_class="FluxPipeline", denoiser="transformer", label="Flux.1", flax=False,
                  tagged_files=True)

FAMILIES = {spec.name: spec for spec in (SD, SDXL, SD3, FLUX)}

# Pipeline class names of each family beyond the text-to-image one (img2img, inpaint, ... load the same weights).
_CLASS_PREFIXES = (("StableDiffusion3", SD3), ("Flux", FLUX), ("StableDiffusionXL", SDXL))


def get(name):
    """The FamilySpec of "sd", "sdxl", "sd3" or "flux" (a FamilySpec passes through)."""
    if isinstance(name, FamilySpec):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; one of {', '.join(FAMILIES)}") from None


def family_from_index(index):
    """The FamilySpec of a model_index.json's contents: its _class_name, else the components it lists."""
    class_name = str(index.get("_class_name") or "")
    for prefix, spec in _CLASS_PREFIXES:
        if class_name.startswith(prefix):
            return spec

    def listed(component):
        value = index.get(component)
        return isinstance(value, (list, tuple)) and bool(value) and bool(value[0])

    if listed("text_encoder_3"):
        return SD3
    if listed("transformer") and listed("text_encoder_2"):
        return FLUX
    return SDXL if listed("text_encoder_2") else SD


def _family_from_folders(folder):
    """A folder of components without model_index.json (only the SD/SDXL layouts are read this way)."""
    return SDXL if os.path.isdir(os.path.join(folder, "text_encoder_2")) else SD


def family_of(name_or_path, revision=None) -> Optional[FamilySpec]:
    """The FamilySpec of a pipeline, from its model_index.json in a local folder or the Hub cache, without loading a
    model. A local folder without model_index.json is SDXL when it has text_encoder_2/, else SD. None when this cannot
    be told yet (a hub id not in the cache): the trainer then decides once the model is loaded."""
    name = str(name_or_path)
    if model_files.local_file(name, "model_index.json", revision) is not None:
        index = model_files.read_json(name, "model_index.json", revision)
        try:
            return family_from_index(index) if index is not None else None
        except (ValueError, AttributeError):
            return None
    if os.path.isdir(name):
        return _family_from_folders(name)
    return None


def trained_encoders(family, enable_t5_ti=False):
    """The EncoderSpecs whose embeddings train, in the pipeline's order: the CLIP encoders, and T5 with
    --enable_t5_ti (diffusers' name)."""
    return tuple(e for e in get(family).encoders if e.kind != "t5" or enable_t5_ti)
