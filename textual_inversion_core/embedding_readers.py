"""Embedding file readers: any supported file into an EmbeddingFile, and a file read for a model of a given family
(SD-1.x/2.x, SDXL, SD3, Flux.1) before the model loads, refusing in one line a file made for another family.

Pickle-based files are read with torch.load(weights_only=True).
"""

import dataclasses
import os
from typing import Optional

import numpy as np

from . import families, model_files
from .embedding_base import (
    _DIFFUSERS_NAME,
    _DIFFUSERS_SET_NAME,
    DIFFUSERS_SAFETENSORS,
    DIFFUSERS_SAFETENSORS_2,
    DIFFUSERS_STEM,
    DIFFUSERS_STEM_2,
    SDXL_PARTS,
    T5_KEYS,
    _torch,
)
from .errors import UserError


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
    readers: clip or diffusers-sdxl (a learned_embeds / learned_embeds_2 pair), with vectors {"clip_l", "clip_g"};
    from the SD3 / Flux.1 reader: clip (one file) or diffusers-set, with vectors {file_key: [n, dim]} and family."""

    vectors: "np.ndarray | dict"
    token: Optional[str] = None
    step: Optional[int] = None
    base_model: Optional[str] = None
    base_model_hash: Optional[str] = None
    kind: str = "raw"
    family: Optional[str] = None


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


# --------------------------------------------------------------------------------------------------
# Any family: which family a file was made for, and the SD3 / Flux.1 readers

_PART_KEYS = ("clip_l", "clip_g") + T5_KEYS


def _diffusers_set_paths(path, first_ext=None):
    """{diffusers_stem: path} of the diffusers files of one run beside path (learned_embeds{,_2,_3}{suffix}, path's
    extension or first_ext first), path's own included; {} when path is not named as a diffusers file."""
    folder, name = os.path.split(path)
    match = _DIFFUSERS_SET_NAME.match(name)
    if not match:
        return {}
    found = {}
    for stem in (DIFFUSERS_STEM, DIFFUSERS_STEM_2, "learned_embeds_3"):
        ext = first_ext or match.group(3)
        for candidate_ext in (ext, "bin" if ext == "safetensors" else "safetensors"):
            candidate = os.path.join(folder, f"{stem}{match.group(2)}.{candidate_ext}")
            if os.path.isfile(candidate):
                found[stem] = candidate
                break
    return found


def _metadata(path):
    try:
        return _read_file(path)[1]
    except UserError:
        return {}


def embedding_family(path):
    """The FamilySpec an embedding file was made for, as far as the file tells (no model needed): the family in its
    metadata (our SD3/Flux.1 files), else its keys (t5xxl or t5 with clip_g: SD3; with clip_l or alone: Flux.1;
    clip_l + clip_g: SDXL), else the diffusers files beside it (three: SD3; a pair: SDXL), else SD-1.x/2.x."""
    data, metadata = _read_file(path)
    told = metadata.get("family")
    if told in families.FAMILIES:
        return families.get(told)
    if isinstance(data, dict) and any(key in data for key in _PART_KEYS):
        if any(key in data for key in T5_KEYS):
            return families.SD3 if "clip_g" in data else families.FLUX
        return families.SDXL if "clip_g" in data else families.SD
    beside = _diffusers_set_paths(path)
    for other in _diffusers_set_paths(path, first_ext="safetensors").values():  # .bin files carry no metadata
        told = _metadata(other).get("family")
        if told in families.FAMILIES:
            return families.get(told)
    if "learned_embeds_3" in beside:
        return families.SD3
    return families.SDXL if len(beside) == 2 else families.SD


def _describe_parts(vectors):
    return " + ".join(f"{key} [{array.shape[0]}, {array.shape[1]}]" for key, array in vectors.items())


def _single_file_parts(path, data):
    """{file_key: [n, dim]} of a one-file embedding: clip_l, clip_g, and T5 from t5xxl (ComfyUI) else t5 (OneTrainer,
    diffusers' advanced scripts)."""
    parts = {key: _part_2d(path, key, data[key]) for key in ("clip_l", "clip_g") if key in data}
    t5_key = next((key for key in T5_KEYS if key in data), None)
    if t5_key is not None:
        parts["t5xxl"] = _part_2d(path, t5_key, data[t5_key])
    return parts


def _wrong_family(path, made_for, vectors, spec):
    keys = ", ".join(spec.file_keys)
    what = f" ({_describe_parts(vectors)})" if vectors else ""
    return UserError(f"{path!r} is {_a(made_for.label)} embedding{what}; this model is {spec.label} (text encoders "
                     f"{keys}): use an embedding made for it, or take one part with "
                     f"`python -m textual_inversion_core.convert {path} OUT.safetensors --dim WIDTH`")


def _a(label):
    """The label with its article: "an SD3", "an SDXL", "a Flux.1" (SD is read letter by letter)."""
    return f"an {label}" if label.startswith("SD") else f"a {label}"


def load_parts_embedding(path, family, widths=None):
    """An embedding file of an SD3 or Flux.1 model (a family with tagged files): an EmbeddingFile whose vectors are
    {file_key: [n, dim]}, the parts the file holds, in the pipeline's order.

    path: a one-file embedding ({clip_l, clip_g, t5xxl}; ours, ComfyUI's, OneTrainer's with t5), or any file of a
    diffusers set (learned_embeds{,_2,_3}*, read with the others beside it); one CLIP set (an SD-1.x file, a lone
    learned_embeds) when the family has one CLIP encoder (Flux.1). widths: {file_key: width} (or a tuple in the
    family's encoder order) when known; checked here. A file made for another family is a one-line UserError."""
    spec = families.get(family)
    data, metadata = _read_file(path)
    made_for = embedding_family(path)
    if isinstance(data, dict) and any(key in data for key in _PART_KEYS):
        found = EmbeddingFile(vectors=_single_file_parts(path, data), token=metadata.get("token") or None,
                              step=_int_or_none(metadata.get("steps")), base_model=metadata.get("base_model") or None,
                              base_model_hash=metadata.get("base_model_hash") or None, kind="clip")
    else:
        beside = _diffusers_set_paths(path)
        if made_for.tagged_files or len(beside) > 1:
            # A set that says its family must be this model's; an untagged one (SDXL's pair, a .bin-only set) is read
            # as this family's files, and the widths tell when it was made for other encoders.
            if made_for.tagged_files and made_for is not spec:
                parts = {stem: load_embedding(p).vectors for stem, p in beside.items()}
                raise _wrong_family(path, made_for, parts, spec)
            parts, token = {}, None
            for encoder in spec.encoders:
                if encoder.diffusers_stem in beside:
                    one = load_embedding(beside[encoder.diffusers_stem])
                    parts[encoder.file_key], token = one.vectors, token or one.token
            found = EmbeddingFile(vectors=parts, token=token, kind="diffusers-set")
        else:
            one = load_embedding(path)
            clip = [encoder for encoder in spec.encoders if encoder.kind == "clip"]
            if len(clip) != 1:
                count, width = one.vectors.shape
                needs = " and ".join(e.file_key for e in clip)
                raise UserError(f"{path!r} is one vector set [{count}, {width}]; {_a(spec.label)} model needs a set for "
                                f"each CLIP text encoder ({needs}): a {{{', '.join(spec.file_keys)}}} .safetensors "
                                f"(ComfyUI) or the learned_embeds files of one run")
            one.vectors = {clip[0].file_key: one.vectors}
            found = one
    if made_for is not spec and (metadata.get("family") or not set(found.vectors) <= set(spec.file_keys)):
        raise _wrong_family(path, made_for, found.vectors, spec)
    if not found.vectors:
        raise UserError(f"{path!r} holds no embedding vectors")
    found.vectors = {key: found.vectors[key] for key in spec.file_keys if key in found.vectors}
    found.family = spec.name
    if len({array.shape[0] for array in found.vectors.values()}) != 1:
        raise UserError(f"{path!r}: {_describe_parts(found.vectors)} differ in their number of vectors; the parts of "
                        "an embedding come from one run")
    if widths is not None:
        if not isinstance(widths, dict):
            widths = dict(zip(spec.file_keys, widths))
        wrong = [f"{key} {array.shape[1]} (the model's {widths[key]})" for key, array in found.vectors.items()
                 if key in widths and array.shape[1] != widths[key]]
        if wrong:
            raise UserError(f"{path!r} has widths {', '.join(wrong)}; it was made for another model")
    return found


def _refuse_tagged_file(path, spec, width=None):
    """For an SD-1.x/2.x or SDXL model: a file of SD3 / Flux.1 (told by its metadata or its T5 part) is refused."""
    made_for = embedding_family(path)
    if made_for is not spec and made_for.tagged_files:
        data = _read_file(path)[0]
        parts = _single_file_parts(path, data) if isinstance(data, dict) and any(k in data for k in _PART_KEYS) else {}
        raise _wrong_family(path, made_for, parts, spec)


def load_model_embedding(path, family, widths=None):
    """An embedding file read for a model of the family ("sd", "sdxl", "sd3", "flux" or a FamilySpec) before any model
    is loaded: vectors float32 [n, dim] for "sd", {"clip_l", "clip_g"} for "sdxl" (see load_sdxl_embedding),
    {file_key: [n, dim]} for SD3 / Flux.1 (see load_parts_embedding).

    widths: the text encoder width(s) when known, an int (or 1-tuple) for "sd", (text_encoder, text_encoder_2) for
    "sdxl", a tuple in encoder order or {file_key: width} for SD3 / Flux.1 (see text_encoder_widths); None leaves the
    width check to the caller. A file of another family is a UserError saying what it is and what the model needs."""
    spec = families.get(family)
    if spec.tagged_files:
        return load_parts_embedding(path, spec, widths)
    _refuse_tagged_file(path, spec)
    if spec is families.SDXL:
        return load_sdxl_embedding(path, widths)
    width = widths[0] if isinstance(widths, (tuple, list)) else widths
    if is_sdxl_embedding(path):
        found = load_sdxl_embedding(path)
        one = f" ({width} wide)" if width else ""
        raise UserError(f"{path!r} is an SDXL embedding ({_describe_sdxl(found.vectors)}); this model is SD-1.x/2.x with "
                        f"one text encoder{one}: use an embedding made for it, or take one part with "
                        f"`python -m textual_inversion_core.convert {path} OUT.safetensors --dim {width or 'WIDTH'}`")
    return load_embedding(path, expected_dim=width)


def text_encoder_widths(name_or_path, family, revision=None):
    """hidden_size (T5: d_model) of the model's text encoders from their config.json, without loading a model, in the
    pipeline's order: (width,) for "sd", (text_encoder's, text_encoder_2's) for "sdxl", all three for "sd3", two for
    "flux"; None when a config is not on this machine (a local folder, or the Hub cache)."""
    widths = []
    for folder in (encoder.subfolder for encoder in families.get(family).encoders):
        config = model_files.read_json(name_or_path, f"{folder}/config.json", revision)
        if config is None:  # not on this machine yet: the width is checked once the model is loaded
            return None
        try:
            config = config.get("text_config", config)
            widths.append(int(config["hidden_size"] if "hidden_size" in config else config["d_model"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    return tuple(widths)

