"""What every embedding file module shares: file names, the base model's public name and hash, and the vector sets.

Vectors travel as numpy float32 arrays [num_vectors, dim] (SD-1.x/2.x: one text encoder) or as a dict
{file_key: [num_vectors, dim]} with one entry per trained text encoder, in the pipeline's order, under the keys
ComfyUI's loaders read (families.EncoderSpec.file_key): SDXL {"clip_l", "clip_g"}; SD3 clip_l, clip_g and, with
T5 trained, t5xxl; Flux.1 clip_l and t5xxl. A dict is read with its family (families.py): given by the caller,
or told from its keys where they are unambiguous (SDXL's pair, anything with clip_g and t5xxl, clip_l with t5xxl).

Files name the base model by its hub id or its folder's name, never by a local path.
"""

import hashlib
import io
import json
import os
import re

import numpy as np

from . import families, model_files
from .errors import UserError

DIFFUSERS_BIN = "learned_embeds.bin"
DIFFUSERS_SAFETENSORS = "learned_embeds.safetensors"
TOKEN_FILE = "token_identifier.txt"
CONCEPT_FILE = "type_of_concept.txt"
# SDXL: the diffusers pair (diffusers' textual_inversion_sdxl.py names), and the one webui/ComfyUI file's keys,
# in text-encoder order.
DIFFUSERS_STEM, DIFFUSERS_STEM_2 = "learned_embeds", "learned_embeds_2"
DIFFUSERS_SAFETENSORS_2 = "learned_embeds_2.safetensors"
SDXL_PARTS = ("clip_l", "clip_g")
SDXL_DESCRIPTION = ("SDXL textual inversion embedding, AUTOMATIC1111 webui / ComfyUI layout: clip_l is the set for "
                    "text_encoder (CLIP ViT-L), clip_g the set for text_encoder_2 (OpenCLIP ViT-bigG)")
# T5's vectors in one-file embeddings: ComfyUI reads t5xxl, OneTrainer and diffusers' advanced scripts read t5.
# Our files hold the same tensor under both; readers take t5xxl, else t5.
T5_KEYS = ("t5xxl", "t5")
# diffusers files: learned_embeds{,_2,_3}{suffix}.{safetensors,bin}; _2 is the SDXL pair's second file.
_DIFFUSERS_NAME = re.compile(r"^learned_embeds(_2)?(.*)\.(safetensors|bin)$")
_DIFFUSERS_SET_NAME = re.compile(r"^learned_embeds(_[23])?(.*)\.(safetensors|bin)$")


def file_stem_for_token(token):
    """A1111 and ComfyUI take the trigger word from the file name: '<cat-toy>' -> 'cat-toy'."""
    stem = re.sub(r"[<>:\"/\\|?*\s]", "", token).strip(".") or "embedding"
    return stem


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - both environments install torch
        raise UserError(".bin/.pt embedding files need torch; install it (pip install torch) or use .safetensors") from err
    return torch


def _pickle_bytes(obj):
    """torch.save bytes in the legacy layout: the webui's safe loader refuses the entries that torch's zip layout
    now adds (.format_version, .storage_alignment); torch.load(weights_only=True) and diffusers read both."""
    torch = _torch()
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


# Hub ids are "name" or "owner/name" of letters, digits and -_. ; anything else is taken for a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_name_without_path(name):
    """name with any directories dropped, judged from the text alone (for names read from files made elsewhere):
    a hub id stays, '/home/me/models/sd15' or 'C:\\models\\sd15' becomes 'sd15'."""
    text = str(name or "").strip()
    if not text or (_HUB_ID.match(text) and ".." not in text):
        return text
    parts = [p for p in re.split(r"[\\/]+", text) if p not in ("", ".", "..")]
    return parts[-1] if parts else ""


def is_local_model(name_or_path):
    """True when --pretrained_model_name_or_path names something on this machine (diffusers' rule: it exists)."""
    return bool(name_or_path) and os.path.exists(str(name_or_path))


def public_model_name(name_or_path):
    """What output files say about the base model: the hub id when it came from the Hub, else its folder's name."""
    if is_local_model(name_or_path):
        return os.path.basename(os.path.normpath(os.path.abspath(str(name_or_path))))
    return model_name_without_path(name_or_path)


SHORT_HASH_DIGITS = 10  # as the webui's short checkpoint hashes: sha256, first 10 hex digits


def _text_encoder_weight_names(variant):
    """Weight file names of a text_encoder/ folder, preferred first (safetensors, sharded safetensors, .bin, Flax)."""
    infixes = [f".{variant}", ""] if variant else [""]
    names = []
    for infix in infixes:
        names += [f"model{infix}.safetensors", f"model{infix}.safetensors.index.json", f"pytorch_model{infix}.bin",
                  f"flax_model{infix}.msgpack"]
    return names


def _text_encoder_weight_files(name_or_path, revision=None, variant=None):
    """Paths of the base model's text-encoder weights on this machine (a local folder, or the Hub cache), or []."""
    def locate(name):
        return model_files.local_file(name_or_path, f"text_encoder/{name}", revision)

    for name in _text_encoder_weight_names(variant):
        path = locate(name)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        paths = [locate(shard) for shard in shards]
        if shards and all(paths):
            return paths
    return []


def text_encoder_short_hash(name_or_path, revision=None, variant=None):
    """sha256 of the base model's text-encoder weight file(s) (shards in name order), first 10 hex digits;
    None when the weights are not on this machine. A single file's hash is the one the Hub shows for it."""
    paths = _text_encoder_weight_files(name_or_path, revision=revision, variant=variant)
    if not paths:
        return None
    digest = hashlib.sha256()
    try:
        for path in paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:SHORT_HASH_DIGITS]


def _as_float32(vectors):
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"embedding must be [num_vectors, dim], got shape {array.shape}")
    return np.ascontiguousarray(array)


def is_sdxl_vectors(vectors):
    """True for vectors of several text encoders (a dict: SDXL's {"clip_l", "clip_g"}, SD3's, Flux's), False for
    one array."""
    return isinstance(vectors, dict)


def vector_family(vectors, family=None):
    """The FamilySpec of vectors: family when given, else told from them: an array is SD-1.x/2.x, {clip_l, clip_g}
    SDXL, clip_g with t5xxl SD3, clip_l with t5xxl Flux.1. Other dicts (SD3's CLIP pair is SDXL's keys; Flux's
    clip_l alone) need the family said."""
    if family is not None:
        return families.get(family)
    if not isinstance(vectors, dict):
        return families.SD
    keys = set(vectors)
    if keys == set(SDXL_PARTS):
        return families.SDXL
    if "t5xxl" in keys:
        return families.SD3 if "clip_g" in keys else families.FLUX
    raise ValueError(f"cannot tell the model family of vectors with keys {sorted(keys)}; pass family")


def named_parts(vectors, family=None):
    """(FamilySpec, [(EncoderSpec, float32 [n, dim]), ...]): the vector sets of the trained encoders, in the pipeline's
    order, checked to be sets of the family's encoders with one number of vectors. One array is the family's first
    encoder's set (SD-1.x/2.x; Flux.1 with CLIP-L alone)."""
    spec = vector_family(vectors, family)
    if not isinstance(vectors, dict):
        vectors = {spec.encoders[0].file_key: vectors}
    unknown = sorted(set(vectors) - set(spec.file_keys))
    if unknown or not vectors:
        raise ValueError(f"{spec.label} vectors take the keys {', '.join(spec.file_keys)}, got {sorted(vectors)}")
    parts = [(encoder, _as_float32(vectors[encoder.file_key])) for encoder in spec.encoders if encoder.file_key in vectors]
    counts = {array.shape[0] for _, array in parts}
    if len(counts) != 1:
        sizes = ", ".join(f"{encoder.file_key} {array.shape[0]}" for encoder, array in parts)
        raise ValueError(f"the text encoders' vector sets differ in their number of vectors ({sizes}); they must be equal")
    return spec, parts


def sdxl_parts(vectors):
    """(clip_l, clip_g) float32 arrays of SDXL vectors, checked to be two sets of the same number of vectors."""
    if set(vectors) != set(SDXL_PARTS):
        raise ValueError(f"SDXL vectors need exactly the keys clip_l and clip_g, got {sorted(vectors)}")
    clip_l, clip_g = (_as_float32(vectors[name]) for name in SDXL_PARTS)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise ValueError(f"clip_l has {clip_l.shape[0]} vectors and clip_g {clip_g.shape[0]}; they must be equal")
    return clip_l, clip_g


def vector_sets(vectors, family=None):
    """One float32 [n, dim] array per trained text encoder, in the model's order: [clip_l, clip_g] for SDXL,
    [vectors] for one array."""
    return [array for _, array in named_parts(vectors, family)[1]]


def count_vectors(vectors, family=None):
    """num_vectors of an array or of a dict of vector sets."""
    return vector_sets(vectors, family)[0].shape[0]
