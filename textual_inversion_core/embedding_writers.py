"""Embedding file writers: diffusers (one {token: [n, dim]} file per trained text encoder), AUTOMATIC1111 .pt,
kohya/ComfyUI single files, and one file in a named format (the converter's output side).

Pickle-based formats (.bin, .pt) need torch and import it only when used; they are written in torch's legacy
(non-zip) layout, which the AUTOMATIC1111 webui's safe loader accepts.
"""

import os

from . import atomic
from .embedding_base import (
    _DIFFUSERS_SET_NAME,
    CONCEPT_FILE,
    SDXL_DESCRIPTION,
    T5_KEYS,
    TOKEN_FILE,
    _as_float32,
    _pickle_bytes,
    _torch,
    file_stem_for_token,
    model_name_without_path,
    named_parts,
    sdxl_parts,
)
from .errors import UserError

# The one-file embedding's description, by family (SDXL's is SDXL_DESCRIPTION, in write_sdxl).
SINGLE_FILE_DESCRIPTIONS = {
    "sd3": ("SD3 textual inversion embedding, ComfyUI layout: clip_l is the set for text_encoder (CLIP ViT-L), clip_g "
            "for text_encoder_2 (OpenCLIP ViT-bigG), t5xxl for text_encoder_3 (T5-XXL); t5 repeats t5xxl for "
            "OneTrainer and diffusers' advanced scripts"),
    "flux": ("Flux.1 textual inversion embedding, ComfyUI layout: clip_l is the set for text_encoder (CLIP ViT-L), "
             "t5xxl for text_encoder_2 (T5-XXL); t5 repeats t5xxl for OneTrainer and diffusers' advanced scripts"),
}


def _diffusers_metadata(spec, encoder):
    """{"format": "np"} as diffusers writes; files of the newer families also say which family and encoder they are
    for, since a learned_embeds_2 file is CLIP-G's in SD3 but T5's in Flux.1."""
    metadata = {"format": "np"}
    if spec.tagged_files:
        metadata.update(family=spec.name, text_encoder=encoder.subfolder, key=encoder.file_key)
    return metadata


def _write_diffusers_files(output_dir, stem, token, vectors, safe_serialization, suffix, metadata=None):
    torch = _torch()
    written = []
    path = os.path.join(output_dir, f"{stem}{suffix}.bin")
    atomic.write_bytes(path, _pickle_bytes({token: torch.from_numpy(vectors.copy())}))
    written.append(path)
    if safe_serialization:
        from safetensors.numpy import save

        path = os.path.join(output_dir, f"{stem}{suffix}.safetensors")
        atomic.write_bytes(path, save({token: vectors}, metadata=metadata or {"format": "np"}))
        written.append(path)
    return written


def write_diffusers(output_dir, token, vectors, safe_serialization=True, suffix="", family=None):
    """One {token: [n, dim]} file per trained text encoder, named by the encoder's place in the pipeline:
    learned_embeds{suffix}.bin (always) and .safetensors (unless disabled) for text_encoder's set,
    learned_embeds_2{suffix}.* for text_encoder_2's, learned_embeds_3{suffix}.* for text_encoder_3's.

    SDXL: the pair of diffusers' SDXL script (clip_l, clip_g); SD3: clip_l, clip_g, t5xxl; Flux.1: clip_l and t5xxl
    (learned_embeds_2 is T5's). vectors: one array, or {file_key: array} (see embedding_base); family: the model's
    family, needed where the keys do not tell it (embedding_base.vector_family)."""
    spec, parts = named_parts(vectors, family)
    written = []
    for encoder, array in parts:
        written += _write_diffusers_files(output_dir, encoder.diffusers_stem, token, array, safe_serialization, suffix,
                                          _diffusers_metadata(spec, encoder))
    return written


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


def _single_file_metadata(spec, parts, token, step, base_model, base_model_hash):
    metadata = {"description": SINGLE_FILE_DESCRIPTIONS[spec.name], "family": spec.name,
                "base_model": model_name_without_path(base_model), "token": token, "num_vectors": str(parts[0][1].shape[0])}
    metadata.update({f"dim_{encoder.file_key}": str(array.shape[1]) for encoder, array in parts})
    metadata["steps"] = str(int(step))
    if base_model_hash:
        metadata["base_model_hash"] = base_model_hash
    return metadata


def write_single_file(path, token, vectors, step, base_model, base_model_hash=None, family=None):
    """Every trained part of a multi-encoder embedding in one safetensors file, under ComfyUI's keys: SDXL
    {"clip_l", "clip_g"} (write_sdxl); SD3/Flux.1 clip_l, clip_g (SD3) and t5xxl, with the same T5 tensor also
    under "t5" (what OneTrainer and diffusers' advanced scripts read). Token, steps, base model and family in the
    metadata."""
    from safetensors.numpy import save

    spec, parts = named_parts(vectors, family)
    if not spec.tagged_files:
        return write_sdxl(path, token, dict((e.file_key, a) for e, a in parts), step, base_model, base_model_hash)
    tensors = {}
    for encoder, array in parts:
        tensors[encoder.file_key] = array
        if encoder.kind == "t5":
            tensors.update({key: array for key in T5_KEYS})
    metadata = _single_file_metadata(spec, parts, token, step, base_model, base_model_hash)
    atomic.write_bytes(path, save(tensors, metadata=metadata))
    return path


def write_all(output_dir, token, vectors, step, base_model, learnable_property, export_formats=(),
              safe_serialization=True, base_model_hash=None, family=None):
    """The final result: diffusers files, token and concept files, and the asked-for extra formats.
    base_model: the name to store (see public_model_name); a path is cut to its last part.

    Families of several text encoders (SDXL, SD3, Flux.1): the diffusers files (one per trained encoder), and for
    a1111 and/or kohya the one <stem>.safetensors of write_single_file, which the webui, ComfyUI, kohya and InvokeAI
    read (an SDXL <stem>.pt beside it would give the webui two embeddings of one name; the converter writes the SDXL
    .pt on request).
    family: see write_diffusers."""
    spec, parts = named_parts(vectors, family)
    written = write_diffusers(output_dir, token, vectors, safe_serialization=safe_serialization, family=spec)
    atomic.write_text(os.path.join(output_dir, TOKEN_FILE), token)
    atomic.write_text(os.path.join(output_dir, CONCEPT_FILE), learnable_property)
    written += [os.path.join(output_dir, TOKEN_FILE), os.path.join(output_dir, CONCEPT_FILE)]
    stem = file_stem_for_token(token)
    if len(spec.encoders) > 1:
        if {"a1111", "kohya"} & set(export_formats):
            written.append(write_single_file(os.path.join(output_dir, f"{stem}.safetensors"), token, vectors, step,
                                             base_model, base_model_hash, family=spec))
        return written
    array = parts[0][1]
    if "a1111" in export_formats:
        written.append(write_a1111(os.path.join(output_dir, f"{stem}.pt"), token, array, step, base_model,
                                   base_model_hash))
    if "kohya" in export_formats:
        written.append(write_kohya(os.path.join(output_dir, f"{stem}.safetensors"), token, array, step, base_model,
                                   base_model_hash))
    return written


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


def write_parts_embedding(path, fmt, token, vectors, step=0, base_model="", base_model_hash=None, family=None):
    """Vectors of several text encoders (SDXL, SD3, Flux.1) in format fmt: kohya -> the one file of
    write_single_file; a1111 -> the webui's SDXL .pt (SDXL only); diffusers / diffusers-bin -> path
    (learned_embeds{suffix}.*) and the files of the other trained encoders beside it (learned_embeds_2,
    learned_embeds_3). Returns the paths written."""
    spec, parts = named_parts(vectors, family)
    if fmt == "kohya":
        return [write_single_file(path, token, vectors, step or 0, base_model, base_model_hash, family=spec)]
    name = os.path.basename(path)
    if fmt == "a1111" and spec.name == "sdxl":  # the webui's loader has an SDXL branch for a pickled {clip_l, clip_g}
        return [write_sdxl_pt(path, dict((encoder.file_key, array) for encoder, array in parts))]
    if fmt == "a1111":
        keys = ", ".join(encoder.file_key for encoder, _ in parts)
        raise UserError(f"the A1111 webui has no {spec.label} .pt; write {os.path.splitext(name)[0]}.safetensors instead "
                        f"(the {{{keys}}} file the webui and ComfyUI read)")
    if fmt == "raw":
        raise UserError(f"a raw tensor holds one vector set and this {spec.label} embedding has "
                        f"{('one', 'two', 'three')[len(parts) - 1]}; "
                        "choose another format")
    if fmt not in ("diffusers", "diffusers-bin"):
        raise UserError(f"unknown embedding format {fmt!r}; choose from {', '.join(WRITE_FORMATS)}")
    match = _DIFFUSERS_SET_NAME.match(name)
    ext = "safetensors" if fmt == "diffusers" else "bin"
    if not match or match.group(1) or match.group(3) != ext:
        names = " and ".join(f"{encoder.diffusers_stem}.{ext}" for encoder, _ in parts)
        raise UserError(f"an {spec.label} embedding in diffusers format is the files {names}; name OUT "
                        f"learned_embeds.{ext} (or give a folder)")
    folder, suffix = os.path.dirname(path), match.group(2)
    written = []
    for encoder, array in parts:
        target = os.path.join(folder, f"{encoder.diffusers_stem}{suffix}.{ext}")
        if fmt == "diffusers":
            from safetensors.numpy import save

            atomic.write_bytes(target, save({token: array}, metadata=_diffusers_metadata(spec, encoder)))
        else:
            atomic.write_bytes(target, _pickle_bytes({token: _torch().from_numpy(array.copy())}))
        written.append(target)
    return written


write_sdxl_embedding = write_parts_embedding  # the SDXL-era name


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
