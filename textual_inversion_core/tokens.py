"""The placeholder tokens in a tokenizer (any Hugging Face tokenizer object; no framework needed)."""

import numpy as np

from .data import placeholder_tokens_for
from .errors import UserError


def initializer_ids(tokenizer, initializer_token):
    """The token ids of --initializer_token, a word or a phrase ("toy", "red toy car"), one id per word.

    Every word must be one token of the original vocabulary: a word the tokenizer cuts into pieces has
    no embedding of its own (and a misspelt word gives arbitrary pieces), so it is refused, naming it.
    """
    words = initializer_token.split()
    if not words:
        raise UserError("--initializer_token is empty; give an existing word close to the concept, "
                        'e.g. --initializer_token="toy"')
    ids = []
    for word in words:
        # Encoded before the new tokens exist: each word must be a word of the original vocabulary.
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        if len(word_ids) != 1:
            pieces = " ".join(tokenizer.convert_ids_to_tokens(word_ids))
            where = f"its word {word!r}" if len(words) > 1 else "it"
            raise UserError(f"--initializer_token {initializer_token!r}: {where} is {len(word_ids)} tokens ({pieces}); "
                            "each word must be a single token of the vocabulary; use common words such as 'toy' or "
                            "'red toy car'")
        ids.append(word_ids[0])
    return ids


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors, initializer_token):
    """Add <tok>, <tok>_1, ... to the tokenizer; return (their ids, the initializer's ids, one per word)."""
    tokens = placeholder_tokens_for(placeholder_token, num_vectors)
    base_vocab = tokenizer.get_vocab()
    for tok in tokens:
        existing = tokenizer.encode(tok, add_special_tokens=False)
        if tok in base_vocab or tok in tokenizer.get_added_vocab() or (len(existing) == 1 and existing[0] < len(base_vocab)):
            raise UserError(f"--placeholder_token {tok!r} is already in the tokenizer's vocabulary; "
                            "pick a new string such as <my-concept>")
    init_ids = initializer_ids(tokenizer, initializer_token)
    added = tokenizer.add_tokens(tokens)
    if added != num_vectors:
        raise UserError(f"--placeholder_token {placeholder_token!r} clashes with existing tokens; "
                        "pick a new string such as <my-concept>")
    return tokenizer.convert_tokens_to_ids(tokens), init_ids


def initializer_rows(num_words, num_vectors):
    """For each of num_vectors vectors, the indices of the initializer words whose embeddings it starts from.

    At least as many vectors as words: the words fill the vectors in order, each repeated over an equal
    share (2 words, 4 vectors: a a b b; one word: every vector is that word, as diffusers does). Fewer
    vectors than words: the phrase is cut into num_vectors consecutive parts and each vector is the mean
    of its part (3 words, 1 vector: the mean of all three), so no word is dropped.
    """
    if num_vectors >= num_words:
        return [[i * num_words // num_vectors] for i in range(num_vectors)]
    return [[j for j in range(num_words) if j * num_vectors // num_words == i] for i in range(num_vectors)]


def initializer_vectors(table, init_ids, num_vectors):
    """The start vectors [num_vectors, dim] float32 from the token-embedding table [vocab, dim] (numpy)."""
    table = np.asarray(table)
    rows = initializer_rows(len(init_ids), num_vectors)
    if all(len(r) == 1 for r in rows):  # plain copies of embedding rows (bit-identical to diffusers' start)
        return np.ascontiguousarray(table[[init_ids[r[0]] for r in rows]], dtype=np.float32)
    return np.stack([table[[init_ids[j] for j in r]].astype(np.float64).mean(axis=0) for r in rows]).astype(np.float32)


def placeholder_string(tokenizer, placeholder_ids):
    """What stands for the concept in a prompt: '<tok> <tok>_1 ...'."""
    return " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
