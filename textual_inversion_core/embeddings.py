"""Embedding files: writers and readers for diffusers, AUTOMATIC1111 and kohya/ComfyUI formats.

Vectors travel as numpy float32 arrays [num_vectors, dim] (SD-1.x/2.x: one text encoder) or, for SDXL, as
{"clip_l": [num_vectors, dim_1], "clip_g": [num_vectors, dim_2]}: text_encoder's set and text_encoder_2's, under the
names the webui/ComfyUI SDXL files use. Pickle-based formats (.bin, .pt) need
torch and import it only when used; they are written in torch's legacy (non-zip) layout, which the
AUTOMATIC1111 webui's safe loader accepts, and read with ``weights_only=True``.

Files name the base model by its hub id or its folder's name, never by a local path.
"""

import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Optional

import numpy as np

from . import atomic
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
    if is_local_model(name_or_path):
        def locate(name):
            path = os.path.join(str(name_or_path), "text_encoder", name)
            return path if os.path.isfile(path) else None
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return []

        def locate(name):
            try:
                found = try_to_load_from_cache(str(name_or_path), f"text_encoder/{name}", revision=revision)
            except Exception:  # not a valid repo id, unreadable cache: there is just no hash to give
                return None
            return found if isinstance(found, str) and os.path.isfile(found) else None

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
    """True for SDXL's {"clip_l", "clip_g"} vectors, False for one array."""
    return isinstance(vectors, dict)


def sdxl_parts(vectors):
    """(clip_l, clip_g) float32 arrays of SDXL vectors, checked to be two sets of the same number of vectors."""
    if set(vectors) != set(SDXL_PARTS):
        raise ValueError(f"SDXL vectors need exactly the keys clip_l and clip_g, got {sorted(vectors)}")
    clip_l, clip_g = (_as_float32(vectors[name]) for name in SDXL_PARTS)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise ValueError(f"clip_l has {clip_l.shape[0]} vectors and clip_g {clip_g.shape[0]}; they must be equal")
    return clip_l, clip_g


def vector_sets(vectors):
    """One float32 [n, dim] array per text encoder, in the model's order: [clip_l, clip_g] for SDXL, [vectors] else."""
    return list(sdxl_parts(vectors)) if is_sdxl_vectors(vectors) else [_as_float32(vectors)]


def count_vectors(vectors):
    """num_vectors of an array or of SDXL's {"clip_l", "clip_g"}."""
    return vector_sets(vectors)[0].shape[0]


def _write_diffusers_files(output_dir, stem, token, vectors, safe_serialization, suffix):
    torch = _torch()
    written = []
    path = os.path.join(output_dir, f"{stem}{suffix}.bin")
    atomic.write_bytes(path, _pickle_bytes({token: torch.from_numpy(vectors.copy())}))
    written.append(path)
    if safe_serialization:
        from safetensors.numpy import save

        path = os.path.join(output_dir, f"{stem}{suffix}.safetensors")
        atomic.write_bytes(path, save({token: vectors}, metadata={"format": "np"}))
        written.append(path)
    return written


def write_diffusers(output_dir, token, vectors, safe_serialization=True, suffix=""):
    """learned_embeds{suffix}.bin (always) and .safetensors (unless disabled): {token: [n, dim]}.

    SDXL vectors give diffusers' SDXL pair: learned_embeds{suffix}.* hold clip_l (text_encoder's set),
    learned_embeds_2{suffix}.* clip_g (text_encoder_2's), each {token: [n, dim]} in the same layout."""
    if is_sdxl_vectors(vectors):
        clip_l, clip_g = sdxl_parts(vectors)
        return (_write_diffusers_files(output_dir, DIFFUSERS_STEM, token, clip_l, safe_serialization, suffix)
                + _write_diffusers_files(output_dir, DIFFUSERS_STEM_2, token, clip_g, safe_serialization, suffix))
    return _write_diffusers_files(output_dir, DIFFUSERS_STEM, token, _as_float32(vectors), safe_serialization, suffix)


def write_a1111(path, token, vectors, step, base_model, base_model_hash=None):
    """AUTOMATIC1111 webui .pt: the file name (without .pt) is the word to use in prompts.

    As the webui's own trainer does, sd_checkpoint_name holds the base model's name and sd_checkpoint a short hash
    (here: of its text-encoder weights, see text_encoder_short_hash)."""
    torch = _torch()
    vectors = _as_float32(vectors)
    payload = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.from_numpy(vectors.copy())},
        "name": file_stem_for_token(token),
        "step": int(step),
        "sd_checkpoint": base_model_hash or None,
        "sd_checkpoint_name": model_name_without_path(base_model) or None,
    }
    atomic.write_bytes(path, _pickle_bytes(payload))
    return path


def write_kohya(path, token, vectors, step, base_model, base_model_hash=None):
    """kohya / ComfyUI single-file safetensors: {"emb_params": [n, dim]} plus metadata."""
    from safetensors.numpy import save

    vectors = _as_float32(vectors)
    metadata = {"base_model": model_name_without_path(base_model), "token": token, "num_vectors": str(vectors.shape[0]),
                "dim": str(vectors.shape[1]), "steps": str(int(step))}
    if base_model_hash:
        metadata["base_model_hash"] = base_model_hash
    atomic.write_bytes(path, save({"emb_params": vectors}, metadata=metadata))
    return path


def write_sdxl(path, token, vectors, step, base_model, base_model_hash=None):
    """The webui/ComfyUI (and kohya) SDXL file: safetensors {"clip_l": [n, dim_1], "clip_g": [n, dim_2]} and nothing
    else (the webui loads every tensor in it); token, steps and base model in the metadata, as write_kohya does."""
    from safetensors.numpy import save

    clip_l, clip_g = sdxl_parts(vectors)
    metadata = {"description": SDXL_DESCRIPTION, "base_model": model_name_without_path(base_model), "token": token,
                "num_vectors": str(clip_l.shape[0]), "dim_clip_l": str(clip_l.shape[1]),
                "dim_clip_g": str(clip_g.shape[1]), "steps": str(int(step))}
    if base_model_hash:
        metadata["base_model_hash"] = base_model_hash
    atomic.write_bytes(path, save({"clip_l": clip_l, "clip_g": clip_g}, metadata=metadata))
    return path


def write_sdxl_pt(path, vectors):
    """The webui's SDXL .pt: a torch pickle (legacy layout, see _pickle_bytes) of exactly {"clip_l", "clip_g"} tensors.
    The webui's loader takes every value of such a dict as a tensor, so unlike write_a1111's file it holds no name,
    step or base model (the {clip_l, clip_g} .safetensors keeps those in its metadata)."""
    torch = _torch()
    clip_l, clip_g = sdxl_parts(vectors)
    atomic.write_bytes(path, _pickle_bytes({"clip_l": torch.from_numpy(clip_l.copy()),
                                            "clip_g": torch.from_numpy(clip_g.copy())}))
    return path


def write_all(output_dir, token, vectors, step, base_model, learnable_property, export_formats=(),
              safe_serialization=True, base_model_hash=None):
    """The final result: diffusers files, token and concept files, and the asked-for extra formats.
    base_model: the name to store (see public_model_name); a path is cut to its last part.

    SDXL vectors: the diffusers pair, and for a1111 and/or kohya the one {"clip_l", "clip_g"} <stem>.safetensors
    that the webui, ComfyUI, kohya and InvokeAI all read (a <stem>.pt beside it would give the webui two embeddings
    of one name; the converter writes the SDXL .pt on request)."""
    written = write_diffusers(output_dir, token, vectors, safe_serialization=safe_serialization)
    atomic.write_text(os.path.join(output_dir, TOKEN_FILE), token)
    atomic.write_text(os.path.join(output_dir, CONCEPT_FILE), learnable_property)
    written += [os.path.join(output_dir, TOKEN_FILE), os.path.join(output_dir, CONCEPT_FILE)]
    stem = file_stem_for_token(token)
    if is_sdxl_vectors(vectors):
        if {"a1111", "kohya"} & set(export_formats):
            written.append(write_sdxl(os.path.join(output_dir, f"{stem}.safetensors"), token, vectors, step, base_model,
                                      base_model_hash))
        return written
    if "a1111" in export_formats:
        written.append(write_a1111(os.path.join(output_dir, f"{stem}.pt"), token, vectors, step, base_model,
                                   base_model_hash))
    if "kohya" in export_formats:
        written.append(write_kohya(os.path.join(output_dir, f"{stem}.safetensors"), token, vectors, step, base_model,
                                   base_model_hash))
    return written


def _load_pickle(path):
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read embedding file {path!r} safely ({str(err).splitlines()[0]}); "
                        "use a .safetensors file or a plain tensor/dict file") from err


def _to_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_file(path):
    """(contents, safetensors metadata) of an embedding file, whichever of safetensors or torch's formats it is in."""
    if not os.path.isfile(path):
        raise UserError(f"embedding file {path!r} does not exist")
    metadata = {}
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON header; torch files are zip or pickle.
    if path.endswith(".safetensors") or (head[8:9] == b"{" and not head.startswith((b"PK", b"\x80"))):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        try:
            data = load_file(path)
            with safe_open(path, framework="np") as f:
                metadata = f.metadata() or {}
        except Exception as err:
            raise UserError(f"cannot read {path!r} as safetensors ({str(err).splitlines()[0]})") from err
    else:
        data = _load_pickle(path)
    return data, metadata


@dataclasses.dataclass
class EmbeddingFile:
    """What an embedding file holds. kind: diffusers, a1111, kohya, clip (SDXL clip_l/clip_g) or raw; from the SDXL
    readers: clip or diffusers-sdxl (a learned_embeds / learned_embeds_2 pair), with vectors {"clip_l", "clip_g"}."""

    vectors: "np.ndarray | dict"
    token: Optional[str] = None
    step: Optional[int] = None
    base_model: Optional[str] = None
    base_model_hash: Optional[str] = None
    kind: str = "raw"


def load_embedding(path, expected_dim=None):
    """Read any supported embedding file into an EmbeddingFile (vectors float32 [num_vectors, dim]).

    Accepted: diffusers {token: tensor} (1-D or 2-D), A1111 .pt (string_to_param), kohya/ComfyUI
    {"emb_params": ...} (token and steps from its metadata), SDXL-style {"clip_l", "clip_g"} (the part
    whose width is expected_dim; clip_l when no width is given), and a raw tensor.
    """
    data, metadata = _read_file(path)
    found = EmbeddingFile(vectors=None)
    if isinstance(data, dict) and "string_to_param" in data:
        found.kind = "a1111"
        found.token = data.get("name") if isinstance(data.get("name"), str) else None
        found.step = _int_or_none(data.get("step"))
        found.base_model = data.get("sd_checkpoint_name") if isinstance(data.get("sd_checkpoint_name"), str) else None
        found.base_model_hash = data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise UserError(f"{path!r}: string_to_param is empty; the A1111 embedding file is damaged")
        data = next(iter(params.values()))
    elif isinstance(data, dict) and "emb_params" in data:
        found.kind = "kohya"
        found.token = metadata.get("token") or None
        found.step = _int_or_none(metadata.get("steps"))
        found.base_model = metadata.get("base_model") or None
        found.base_model_hash = metadata.get("base_model_hash") or None
        data = data["emb_params"]
    elif isinstance(data, dict) and ("clip_l" in data or "clip_g" in data):
        found.kind = "clip"
        parts = {k: _to_numpy(data[k]) for k in ("clip_l", "clip_g") if k in data}
        matching = [v for v in parts.values() if expected_dim is None or v.shape[-1] == expected_dim]
        if not matching:
            widths = ", ".join(f"{k}={v.shape[-1]}" for k, v in parts.items())
            raise UserError(f"{path!r} has no part of width {expected_dim} ({widths}); it was made for another text encoder")
        data = matching[0]
    elif isinstance(data, dict):
        if len(data) != 1:
            raise UserError(f"{path!r} holds {len(data)} tensors ({', '.join(map(str, list(data)[:4]))}); "
                            "expected one embedding (diffusers, A1111 or kohya format)")
        found.kind = "diffusers"
        found.token, data = next(iter(data.items()))
    elif not (hasattr(data, "shape") and hasattr(data, "dtype")):
        raise UserError(f"{path!r} holds a {type(data).__name__}, not an embedding (diffusers, A1111, kohya or a tensor)")
    vectors = _to_numpy(data)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2:
        raise UserError(f"{path!r}: embedding has shape {tuple(vectors.shape)}, expected [num_vectors, dim]")
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        raise UserError(f"{path!r}: embedding width {vectors.shape[1]} does not match the text encoder's {expected_dim}; "
                        "it was trained for another model")
    found.vectors = np.ascontiguousarray(vectors)
    return found


def read_embedding(path, expected_dim=None):
    """Read any supported embedding file. Returns (token or None, float32 [num_vectors, dim])."""
    found = load_embedding(path, expected_dim=expected_dim)
    return found.token, found.vectors


# --------------------------------------------------------------------------------------------------
# SDXL files: {"clip_l", "clip_g"} (webui/ComfyUI/kohya), or diffusers' learned_embeds + learned_embeds_2 pair

_DIFFUSERS_NAME = re.compile(r"^learned_embeds(_2)?(.*)\.(safetensors|bin)$")


def sdxl_twin_path(path):
    """The other file of a diffusers SDXL pair when it is beside path (learned_embeds{suffix}.safetensors <->
    learned_embeds_2{suffix}.safetensors, .bin alike, else the other extension), or None."""
    folder, name = os.path.split(path)
    match = _DIFFUSERS_NAME.match(name)
    if not match:
        return None
    stem = DIFFUSERS_STEM if match.group(1) else DIFFUSERS_STEM_2
    ext = match.group(3)
    for twin_ext in (ext, "bin" if ext == "safetensors" else "safetensors"):
        twin = os.path.join(folder, f"{stem}{match.group(2)}.{twin_ext}")
        if os.path.isfile(twin):
            return twin
    return None


def _is_second_of_pair(path):
    return bool(_DIFFUSERS_NAME.match(os.path.basename(path)).group(1))


def _has_both_parts(data):
    return isinstance(data, dict) and all(name in data for name in SDXL_PARTS)


def is_sdxl_embedding(path):
    """True for a file load_sdxl_embedding reads: {"clip_l", "clip_g"}, or a diffusers file with its twin beside it."""
    return sdxl_twin_path(path) is not None or _has_both_parts(_read_file(path)[0])


def _describe_sdxl(vectors):
    return " + ".join(f"{name} [{vectors[name].shape[0]}, {vectors[name].shape[1]}]" for name in SDXL_PARTS)


def _part_2d(path, name, value):
    vectors = _to_numpy(value)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2:
        raise UserError(f"{path!r}: {name} has shape {tuple(vectors.shape)}, expected [num_vectors, dim]")
    return np.ascontiguousarray(vectors)


def load_sdxl_embedding(path, widths=None):
    """Both parts of an SDXL embedding: an EmbeddingFile whose vectors are {"clip_l": [n, d1], "clip_g": [n, d2]}.

    path: a {"clip_l", "clip_g"} file, or either file of a diffusers pair (learned_embeds*.safetensors|.bin with its
    learned_embeds_2 twin beside it). widths: (text_encoder's, text_encoder_2's) when known; checked here. An SD-1.x/2.x
    file (one vector set) is a UserError saying what it is and what an SDXL model needs."""
    data, metadata = _read_file(path)
    if isinstance(data, dict) and any(name in data for name in SDXL_PARTS):
        missing = [name for name in SDXL_PARTS if name not in data]
        if missing:
            raise UserError(f"{path!r} has {', '.join(n for n in SDXL_PARTS if n in data)} but no {missing[0]}; "
                            "an SDXL embedding needs both clip_l (text_encoder) and clip_g (text_encoder_2)")
        parts = {name: _part_2d(path, name, data[name]) for name in SDXL_PARTS}
        found = EmbeddingFile(vectors=parts, token=metadata.get("token") or None, step=_int_or_none(metadata.get("steps")),
                              base_model=metadata.get("base_model") or None,
                              base_model_hash=metadata.get("base_model_hash") or None, kind="clip")
    else:
        twin = sdxl_twin_path(path)
        if twin is None:
            raise _one_set_for_sdxl(path, load_embedding(path).vectors, widths)
        first_path, second_path = (twin, path) if _is_second_of_pair(path) else (path, twin)
        first, second = load_embedding(first_path), load_embedding(second_path)
        if first.vectors.shape[0] != second.vectors.shape[0]:
            raise UserError(f"{first_path!r} has {first.vectors.shape[0]} vectors but {second_path!r} "
                            f"{second.vectors.shape[0]}; the two files of an SDXL embedding come from one run")
        found = EmbeddingFile(vectors={"clip_l": first.vectors, "clip_g": second.vectors}, token=first.token,
                              kind="diffusers-sdxl")
    if found.vectors["clip_l"].shape[0] != found.vectors["clip_g"].shape[0]:
        raise UserError(f"{path!r}: {_describe_sdxl(found.vectors)} differ in their number of vectors; the file is damaged")
    if widths is not None:
        got = (found.vectors["clip_l"].shape[1], found.vectors["clip_g"].shape[1])
        if got != tuple(widths):
            swapped = " (clip_l and clip_g swapped?)" if got == tuple(widths)[::-1] else ""
            raise UserError(f"{path!r} is an SDXL embedding of widths clip_l {got[0]}, clip_g {got[1]}{swapped}, but this "
                            f"model's text encoders are {widths[0]} (text_encoder) and {widths[1]} (text_encoder_2) "
                            "wide; it was made for another model")
    return found


def _one_set_for_sdxl(path, vectors, widths):
    count, width = vectors.shape
    beside = f", no {DIFFUSERS_STEM_2} file beside it" if _DIFFUSERS_NAME.match(os.path.basename(path)) else ""
    what = f"{path!r} is an SD-1.x/2.x embedding (one vector set [{count}, {width}]{beside})"
    if widths is not None and width not in tuple(widths):
        return UserError(f"{what}; its width {width} fits neither of this SDXL model's text encoders ({widths[0]} and "
                         f"{widths[1]} wide); it was made for another model")
    return UserError(f"{what}; an SDXL model needs a set for each text encoder: a {{clip_l, clip_g}} .safetensors "
                     f"(webui/ComfyUI) or {DIFFUSERS_SAFETENSORS} with {DIFFUSERS_SAFETENSORS_2} beside it")


def load_model_embedding(path, family, widths=None):
    """An embedding file read for a model of family "sd" (SD-1.x/2.x, one text encoder) or "sdxl" (two), before any
    model is loaded: vectors float32 [n, dim] for "sd", {"clip_l", "clip_g"} for "sdxl" (see load_sdxl_embedding).

    widths: the text encoder width(s) when known, an int (or 1-tuple) for "sd", (text_encoder, text_encoder_2) for
    "sdxl" (see text_encoder_widths); None leaves the width check to the caller. A file of the other family is a
    UserError saying what it is and what the model needs."""
    if family == "sdxl":
        return load_sdxl_embedding(path, widths)
    if family != "sd":
        raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")
    width = widths[0] if isinstance(widths, (tuple, list)) else widths
    if is_sdxl_embedding(path):
        found = load_sdxl_embedding(path)
        one = f" ({width} wide)" if width else ""
        raise UserError(f"{path!r} is an SDXL embedding ({_describe_sdxl(found.vectors)}); this model is SD-1.x/2.x with "
                        f"one text encoder{one}: use an embedding made for it, or take one part with "
                        f"`python -m textual_inversion_core.convert {path} OUT.safetensors --dim {width or 'WIDTH'}`")
    return load_embedding(path, expected_dim=width)


def text_encoder_widths(name_or_path, family, revision=None):
    """hidden_size of the model's text encoder(s) from their config.json, without loading a model: (width,) for
    "sd", (text_encoder's, text_encoder_2's) for "sdxl"; None when a config is not on this machine (a local folder,
    or the Hub cache)."""
    folders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    widths = []
    for folder in folders:
        if is_local_model(name_or_path):
            path = os.path.join(str(name_or_path), folder, "config.json")
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                path = try_to_load_from_cache(str(name_or_path), f"{folder}/config.json", revision=revision)
            except Exception:  # not a repo id, no cache: the width is checked once the model is loaded
                return None
        if not isinstance(path, str) or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            widths.append(int(config.get("text_config", config)["hidden_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return tuple(widths)


# --------------------------------------------------------------------------------------------------
# One file in a named format (the converter's output side)

WRITE_FORMATS = ("diffusers", "diffusers-bin", "a1111", "kohya", "raw")


def guess_format(path):
    """The format a file name implies: .pt -> a1111, .bin -> diffusers-bin,
    learned_embeds*.safetensors -> diffusers, any other .safetensors -> kohya."""
    name = os.path.basename(path)
    if name.endswith(".pt"):
        return "a1111"
    if name.endswith(".bin"):
        return "diffusers-bin"
    if name.endswith(".safetensors"):
        return "diffusers" if name.startswith("learned_embeds") else "kohya"
    return None


def write_sdxl_embedding(path, fmt, token, vectors, step=0, base_model="", base_model_hash=None):
    """SDXL vectors in format fmt: kohya -> the one {"clip_l", "clip_g"} file; a1111 -> the webui's SDXL .pt (the same
    two tensors pickled); diffusers / diffusers-bin -> path (learned_embeds*) and its learned_embeds_2 twin. Returns
    the paths written."""
    if fmt == "kohya":
        return [write_sdxl(path, token, vectors, step or 0, base_model, base_model_hash)]
    name = os.path.basename(path)
    if fmt == "a1111":
        return [write_sdxl_pt(path, vectors)]
    if fmt == "raw":
        raise UserError("a raw tensor holds one vector set and an SDXL embedding has two; choose another format")
    if fmt not in ("diffusers", "diffusers-bin"):
        raise UserError(f"unknown embedding format {fmt!r}; choose from {', '.join(WRITE_FORMATS)}")
    match = _DIFFUSERS_NAME.match(name)
    ext = "safetensors" if fmt == "diffusers" else "bin"
    if not match or match.group(1) or match.group(3) != ext:
        raise UserError(f"an SDXL embedding in diffusers format is a pair of files learned_embeds.{ext} and "
                        f"learned_embeds_2.{ext}; name OUT learned_embeds.{ext} (or give a folder)")
    clip_l, clip_g = sdxl_parts(vectors)
    twin = os.path.join(os.path.dirname(path), f"{DIFFUSERS_STEM_2}{match.group(2)}.{ext}")
    return [write_embedding(path, fmt, token, clip_l), write_embedding(twin, fmt, token, clip_g)]


def write_embedding(path, fmt, token, vectors, step=0, base_model="", base_model_hash=None):
    """Write one file in format fmt (one of WRITE_FORMATS). Returns the path."""
    vectors = _as_float32(vectors)
    if fmt == "a1111":
        return write_a1111(path, token, vectors, step or 0, base_model, base_model_hash)
    if fmt == "kohya":
        return write_kohya(path, token, vectors, step or 0, base_model, base_model_hash)
    torch = _torch() if fmt in ("diffusers-bin", "raw") else None
    if fmt == "diffusers":
        from safetensors.numpy import save

        atomic.write_bytes(path, save({token: vectors}, metadata={"format": "np"}))
    elif fmt in ("diffusers-bin", "raw"):
        tensor = torch.from_numpy(vectors.copy())
        atomic.write_bytes(path, _pickle_bytes({token: tensor} if fmt == "diffusers-bin" else tensor))
    else:
        raise UserError(f"unknown embedding format {fmt!r}; choose from {', '.join(WRITE_FORMATS)}")
    return path
