"""Convert an embedding file between the diffusers, AUTOMATIC1111, kohya/ComfyUI and raw-tensor formats.

    python -m textual_inversion_core.convert IN OUT [--token TOKEN] [--format FORMAT] [--dim WIDTH]

IN may be any file the trainers' --init_from accepts. The output format comes from --format or from
OUT's name: NAME.pt -> A1111, learned_embeds*.safetensors -> diffusers, other .safetensors -> kohya /
ComfyUI, .bin -> diffusers pickle; --format never writes under a name whose extension says another kind of file
(safetensors formats: .safetensors; pickles: .pt or .bin). OUT may also be a folder: it then gets the diffusers files, the
token files and the A1111 and kohya files named after the token, as a training run writes them.

Embeddings of several text encoders keep every part: IN may be a one-file embedding (SDXL {clip_l, clip_g};
SD3 / Flux.1 {clip_l, clip_g, t5xxl}, OneTrainer's with t5) or any file of a diffusers set (learned_embeds,
learned_embeds_2, learned_embeds_3 of one run); OUT NAME.safetensors is the one file (webui, ComfyUI, kohya; for
SD3 / Flux.1 T5 under both t5xxl and t5), learned_embeds.safetensors (or .bin) writes the set. --dim WIDTH takes
the one part of that width instead, as an SD-1.x/2.x embedding.
"""

import argparse
import os
import sys

from . import embeddings
from .errors import UserError, run_cli

FOLDER = "folder"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m textual_inversion_core.convert",
                                description="Convert a Textual Inversion embedding file to another format.")
    p.add_argument("input", metavar="IN",
                   help="embedding file to read (diffusers, A1111 .pt, kohya, clip_l/clip_g/t5xxl/t5, tensor)")
    p.add_argument("output", metavar="OUT", help="file to write, or a folder (ends with / or exists) for every format")
    p.add_argument("--token", default=None,
                   help="token to store (default: the one in IN; A1111 files carry the bare trigger word)")
    p.add_argument("--format", dest="fmt", default=None, choices=embeddings.WRITE_FORMATS + (FOLDER,),
                   help="output format (default: guessed from OUT's name)")
    p.add_argument("--dim", type=int, default=None,
                   help="text encoder width; takes the clip_l (768), clip_g (1280) or t5xxl (4096) part of an SDXL, SD3 or "
                        "Flux.1 embedding as a one-encoder embedding (without it every part is kept)")
    p.add_argument("--learnable_property", default="object", choices=["object", "style"],
                   help="written to type_of_concept.txt when OUT is a folder")
    return p


# The names each format's bytes may have: the webui, ComfyUI and InvokeAI pick their reader by the extension
# (safetensors for .safetensors, torch.load for .pt/.bin), so other bytes under that name fail to load there.
EXTENSIONS = {"diffusers": (".safetensors",), "kohya": (".safetensors",), "diffusers-bin": (".bin", ".pt"),
              "a1111": (".pt", ".bin"), "raw": (".pt", ".bin")}


def check_extension(path, fmt):
    """Refuse an OUT whose name says another kind of file than --format writes."""
    name = os.path.basename(path.rstrip("/" + os.sep))
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UserError(f"--format {fmt} writes one file but OUT {name!r} is a folder; name a file in it, or pass "
                        f"--format {FOLDER} for every format")
    allowed = EXTENSIONS[fmt]
    stem, ext = os.path.splitext(name)
    if ext.lower() in allowed:
        return
    kind = "safetensors" if allowed == (".safetensors",) else "a torch pickle"
    guessed = embeddings.guess_format(path)
    instead = f", or drop --format to write what the name says ({guessed})" if guessed else ""
    named = f"ends in {ext}" if ext else "has no extension"
    raise UserError(f"--format {fmt} writes {kind}, but OUT {name!r} {named}: tools would fail to load it; "
                    f"name it {stem}{allowed[0]}{instead}")


def output_format(path, fmt):
    if fmt == FOLDER:
        return fmt
    if fmt:
        check_extension(path, fmt)
        return fmt
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return FOLDER
    guessed = embeddings.guess_format(path)
    if guessed is None:
        raise UserError(f"cannot tell the output format from {path!r}; name it *.pt, *.safetensors or *.bin, "
                        f"or pass --format ({', '.join(embeddings.WRITE_FORMATS)}, {FOLDER})")
    return guessed


def default_token(path, found):
    if found.token:
        return found.token
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"<{embeddings.file_stem_for_token(stem)}>"


def read_input(input_path, dim=None):
    """IN as an EmbeddingFile: an embedding of several text encoders (SDXL, SD3, Flux.1) keeps every part
    ({file_key: [n, dim]}, with its family) unless dim picks the part of that width; any other file gives its one
    vector set (of width dim when given)."""
    family = embeddings.embedding_family(input_path)
    if len(family.encoders) == 1:
        return embeddings.load_embedding(input_path, expected_dim=dim)
    found = embeddings.load_model_embedding(input_path, family)
    if dim is not None:
        matching = [key for key, vectors in found.vectors.items() if vectors.shape[1] == dim]
        if not matching:
            widths = ", ".join(f"{key}={vectors.shape[1]}" for key, vectors in found.vectors.items())
            raise UserError(f"{input_path!r} has no part of width {dim} ({widths}); pass --dim with one of these widths")
        found.vectors, found.family = found.vectors[matching[0]], None
    return found


def convert(input_path, output_path, token=None, fmt=None, dim=None, learnable_property="object"):
    """Convert one file; returns (token used, list of written paths)."""
    fmt = output_format(output_path, fmt)
    found = read_input(input_path, dim)
    token = token or default_token(input_path, found)
    if any(c.isspace() for c in token) or not token:
        raise UserError(f"--token {token!r} must be one word without spaces, e.g. <cat-toy>")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise UserError("IN and OUT are the same file; write the converted embedding to another path")
    # The base model's name as IN stored it: the writers cut a path (an older file's sd_checkpoint_name) to its
    # last part, so a converted file never names a folder of the machine IN was made on.
    step, base_model, base_hash = found.step or 0, found.base_model or "", found.base_model_hash
    if fmt == FOLDER:
        os.makedirs(output_path, exist_ok=True)
        written = embeddings.write_all(output_path, token, found.vectors, step, base_model, learnable_property,
                                       export_formats=("a1111", "kohya"), base_model_hash=base_hash,
                                       family=found.family)
    else:
        folder = os.path.dirname(os.path.abspath(output_path))
        if not os.path.isdir(folder):
            raise UserError(f"folder {folder!r} for OUT does not exist; create it first")
        if embeddings.is_sdxl_vectors(found.vectors):
            written = embeddings.write_parts_embedding(output_path, fmt, token, found.vectors, step, base_model,
                                                       base_hash, family=found.family)
        else:
            written = [embeddings.write_embedding(output_path, fmt, token, found.vectors, step, base_model, base_hash)]
    return token, written


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    token, written = convert(args.input, args.output, token=args.token, fmt=args.fmt, dim=args.dim,
                             learnable_property=args.learnable_property)
    for path in written:
        print(f"wrote {path} (token {token})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
