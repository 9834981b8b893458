"""A CLIP tokenizer from either file layout a pipeline folder may hold (transformers is imported only when called).

Pipelines saved by transformers 5 keep only tokenizer.json; older ones and the Hub's SD/SDXL repos have
vocab.json + merges.txt. transformers 4.x's CLIPTokenizer reads only vocab.json + merges.txt (without them it
stops with a TypeError traceback), so a folder holding only tokenizer.json gets CLIPTokenizerFast, which
reads it in 4.x and is the same class as CLIPTokenizer in transformers 5.
"""

import os

from .errors import UserError

VOCAB_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"


def _where(path_or_id, subfolder):
    if os.path.isdir(str(path_or_id)):
        return os.path.join(str(path_or_id), subfolder) if subfolder else str(path_or_id)
    return f"{path_or_id}/{subfolder} on the Hub" if subfolder else f"{path_or_id} on the Hub"


def _has_file(path_or_id, subfolder, name, revision):
    """True/False when the tokenizer folder has (or lacks) file name; None when that cannot be told without
    asking the Hub (a hub id whose files are not in the cache yet)."""
    if os.path.isdir(str(path_or_id)):
        return os.path.isfile(os.path.join(str(path_or_id), subfolder or "", name))
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/{name}" if subfolder else name
    try:
        cached = try_to_load_from_cache(str(path_or_id), filename, revision=revision)
    except Exception:  # not a repo id: transformers' own loading names the problem
        return None
    if isinstance(cached, str):
        return True
    return False if cached is not None else None  # not None: the cache's record that the Hub has no such file


def tokenizer_layout(path_or_id, subfolder=None, revision=None):
    """"vocab" (vocab.json + merges.txt), "tokenizer.json" (only that), or None for a hub id whose files are not
    in the cache. A folder with neither layout is a UserError naming it and the missing files."""
    if os.path.exists(str(path_or_id)) and not os.path.isdir(str(path_or_id)):
        raise UserError(f"{path_or_id!r} is a file; a tokenizer is a folder with vocab.json + merges.txt or "
                        "tokenizer.json (a pipeline's tokenizer/ folder)")
    vocab = [_has_file(path_or_id, subfolder, name, revision) for name in VOCAB_FILES]
    if all(vocab):
        return "vocab"
    single = _has_file(path_or_id, subfolder, TOKENIZER_JSON, revision)
    if single:
        return "tokenizer.json"
    if None in vocab or single is None:
        return None
    where = _where(path_or_id, subfolder)
    if os.path.isdir(str(path_or_id)) and not os.path.isdir(os.path.join(str(path_or_id), subfolder or "")):
        raise UserError(f"{where!r} does not exist; the model needs a tokenizer folder there with vocab.json + "
                        "merges.txt or tokenizer.json")
    missing = " and ".join(name for name, present in zip(VOCAB_FILES, vocab) if not present)
    raise UserError(f"no tokenizer in {where!r}: it has neither vocab.json + merges.txt (missing {missing}) nor "
                    "tokenizer.json; copy the tokenizer files of the base model there or pass --tokenizer_name")


def load_clip_tokenizer(path_or_id, subfolder=None, revision=None):
    """The CLIP tokenizer of a folder or hub id (subfolder: e.g. "tokenizer" or "tokenizer_2" of a pipeline):
    CLIPTokenizer for vocab.json + merges.txt, CLIPTokenizerFast for a folder with only tokenizer.json.

    transformers' own errors (a hub id that cannot be fetched, ...) pass through as OSError/ValueError."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    layout = tokenizer_layout(path_or_id, subfolder, revision)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if layout == "tokenizer.json":
        return CLIPTokenizerFast.from_pretrained(path_or_id, revision=revision, **kwargs)
    if layout == "vocab":
        return CLIPTokenizer.from_pretrained(path_or_id, revision=revision, **kwargs)
    # A hub id not in the cache yet: transformers fetches what the repo has, then the cache says which layout it is.
    # Without files, 4.x's CLIPTokenizer stops with a TypeError and 5.x's builds an empty tokenizer, so neither
    # result is kept.
    try:
        CLIPTokenizer.from_pretrained(path_or_id, revision=revision, **kwargs)
    except TypeError:
        pass
    layout = tokenizer_layout(path_or_id, subfolder, revision)
    if layout is None:
        raise UserError(f"the tokenizer files of {_where(path_or_id, subfolder)} are not on this machine and could not "
                        "be downloaded (HF_HUB_OFFLINE set, or the Hub unreachable); download the model first or "
                        "point --pretrained_model_name_or_path at a local folder")
    cls = CLIPTokenizerFast if layout == "tokenizer.json" else CLIPTokenizer
    return cls.from_pretrained(path_or_id, revision=revision, **kwargs)
