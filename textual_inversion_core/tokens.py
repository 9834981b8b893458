"""The placeholder tokens in a tokenizer (any Hugging Face tokenizer object; no framework needed)."""

from .data import placeholder_tokens_for
from .errors import UserError


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors, initializer_token):
    """Add <tok>, <tok>_1, ... to the tokenizer; return (their ids, the initializer's id)."""
    tokens = placeholder_tokens_for(placeholder_token, num_vectors)
    base_vocab = tokenizer.get_vocab()
    for tok in tokens:
        existing = tokenizer.encode(tok, add_special_tokens=False)
        if tok in base_vocab or tok in tokenizer.get_added_vocab() or (len(existing) == 1 and existing[0] < len(base_vocab)):
            raise UserError(f"--placeholder_token {tok!r} is already in the tokenizer's vocabulary; "
                            "pick a new string such as <my-concept>")
    # Encoded before the new tokens exist: the initializer must be a word of the original vocabulary.
    init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(init_ids)
        raise UserError(f"--initializer_token {initializer_token!r} is {len(init_ids)} tokens ({' '.join(pieces)}), "
                        "it must be a single token; use one common word such as 'toy' or 'painting'")
    added = tokenizer.add_tokens(tokens)
    if added != num_vectors:
        raise UserError(f"--placeholder_token {placeholder_token!r} clashes with existing tokens; "
                        "pick a new string such as <my-concept>")
    return tokenizer.convert_tokens_to_ids(tokens), init_ids[0]


def placeholder_string(tokenizer, placeholder_ids):
    """What stands for the concept in a prompt: '<tok> <tok>_1 ...'."""
    return " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
