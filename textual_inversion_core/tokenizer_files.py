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
    """True/False when the tokenizer folder has (or lacks) file name; None when that cannot be told (a hub id
    not in the cache and the Hub unreachable): the caller then lets transformers try, and report, as before."""
    if os.path.isdir(str(path_or_id)):
        return os.path.isfile(os.path.join(str(path_or_id), subfolder or "", name))
    from transformers.utils import cached_file

    try:
        found = cached_file(str(path_or_id), name, subfolder=subfolder or "", revision=revision,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # not a repo id, no access, ...: transformers' own loading names the problem
        return None
    return found is not None


def tokenizer_layout(path_or_id, subfolder=None, revision=None):
    """"vocab" (vocab.json + merges.txt), "tokenizer.json" (only that), or None when a hub id's files cannot be
    checked. A folder with neither layout is a UserError naming it and the missing files."""
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
    CLIPTokenizer for vocab.json + merges.txt, CLIPTokenizerFast for a folder with only tokenizer.json."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    cls = CLIPTokenizerFast if tokenizer_layout(path_or_id, subfolder, revision) == "tokenizer.json" else CLIPTokenizer
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return cls.from_pretrained(path_or_id, revision=revision, **kwargs)
