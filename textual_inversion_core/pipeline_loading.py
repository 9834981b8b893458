"""Put an embedding of any family into a loaded diffusers pipeline: SD-1.x/2.x, SDXL, SD3 and Flux.1.

    from textual_inversion_core.pipeline_loading import load_embedding_into_pipeline

    trigger = load_embedding_into_pipeline(pipe, "text-inversion-model")   # the --output_dir, or any one file
    image = pipe(f"a photo of {trigger} on a beach").images[0]

SD, SDXL and Flux.1 go through diffusers' own load_textual_inversion, once per encoder (Flux.1's T5 part through
text_encoder_2 / tokenizer_2). StableDiffusion3Pipeline has no textual-inversion loader: the tokens are added to each
tokenizer and the vectors written into each encoder's input embeddings here. torch is imported only when called.
"""

import os

from . import embeddings, families
from .errors import UserError


def _embedding_file(path):
    """The file to read in an output folder (the diffusers file of text_encoder, else the one-file embedding), or
    path itself."""
    if not os.path.isdir(path):
        return path
    for name in (embeddings.DIFFUSERS_SAFETENSORS, embeddings.DIFFUSERS_BIN):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(f"{path!r} holds no {embeddings.DIFFUSERS_SAFETENSORS} or {embeddings.DIFFUSERS_BIN}; "
                    "pass the embedding file itself")


def _default_token(file_path, found):
    """The token stored in the file (or in token_identifier.txt beside it), else the file name without extension,
    the word AUTOMATIC1111 and ComfyUI trigger an embedding with."""
    if found.token:
        return found.token
    beside = os.path.join(os.path.dirname(file_path), embeddings.TOKEN_FILE)
    if os.path.isfile(beside):
        with open(beside, encoding="utf-8") as f:
            token = f.read().strip()
        if token:
            return token
    return os.path.splitext(os.path.basename(file_path))[0]


def _token_names(token, count):
    """diffusers' names of a multi-vector embedding's tokens: token, token_1, token_2, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def _set_token_rows(text_encoder, tokenizer, tokens, vectors):
    """Add tokens to tokenizer and write vectors (torch [n, dim]) into their rows of text_encoder's input embeddings,
    growing the table only when a new id is past its end (T5 keeps spare rows past its vocabulary)."""
    import torch

    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise UserError(f"the tokenizer already has {taken[0]!r}; load the embedding under another token (token=...)")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = text_encoder.get_input_embeddings().weight
    if max(ids) >= table.shape[0]:
        text_encoder.resize_token_embeddings(max(ids) + 1)
        table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = vectors.to(device=table.device, dtype=table.dtype)


def load_embedding_into_pipeline(pipe, path, token=None):
    """Load an embedding of the pipeline's family into every text encoder it has a part for. Returns the text to
    write in prompts: the token (diffusers expands a multi-vector token itself), or for SD3 with several vectors the
    token and its _1, _2, ... tokens joined by spaces (StableDiffusion3Pipeline does not expand it).

    path: an output folder of this trainer (its learned_embeds files are read, the others beside them), or any file
    --init_from reads: a diffusers file (with the set's other files beside it), the one-file embedding
    ({clip_l, clip_g, t5xxl}; OneTrainer's t5), an A1111 .pt or kohya file for SD-1.x. token: the token to add
    (default: the one stored in the file, else the file's name). A file of another family is a one-line UserError.
    Encoders the pipeline was loaded without (e.g. SD3 with text_encoder_3=None) are skipped."""
    import torch

    spec = families.family_from_index(dict(pipe.config))
    file_path = _embedding_file(str(path))
    widths = tuple(getattr(pipe, e.subfolder).get_input_embeddings().weight.shape[1]
                   if getattr(pipe, e.subfolder, None) is not None else None for e in spec.encoders)
    found = embeddings.load_model_embedding(file_path, spec, widths if None not in widths else None)
    token = token or _default_token(file_path, found)
    parts = found.vectors if isinstance(found.vectors, dict) else {spec.encoders[0].file_key: found.vectors}
    count = next(iter(parts.values())).shape[0]
    tokens = _token_names(token, count)
    for encoder in spec.encoders:
        text_encoder, tokenizer = getattr(pipe, encoder.subfolder, None), getattr(pipe, encoder.tokenizer, None)
        if encoder.file_key not in parts or text_encoder is None or tokenizer is None:
            continue
        vectors = torch.from_numpy(parts[encoder.file_key].copy())
        if hasattr(pipe, "load_textual_inversion"):
            pipe.load_textual_inversion(vectors, token=token, text_encoder=text_encoder, tokenizer=tokenizer)
        else:
            _set_token_rows(text_encoder, tokenizer, tokens, vectors)
    return token if hasattr(pipe, "load_textual_inversion") else " ".join(tokens)
