"""--initializer_token as a word or a phrase (textual_inversion_core/tokens.py): which embeddings each
vector starts from, the errors for words the vocabulary does not have, and the start the PyTorch trainer
exports with --learning_rate 0 (which writes the initial vectors unchanged)."""

import os

import numpy as np
import pytest

from helpers import PLACEHOLDER, REPO, base_args, read_vectors, run_in_process
from textual_inversion_core.errors import UserError
from textual_inversion_core.tokens import add_placeholder_tokens, initializer_ids, initializer_rows, initializer_vectors

TOKENIZER = os.path.join(REPO, "tests", "assets", "shapes-sd", "tokenizer")  # the real CLIP vocabulary


@pytest.fixture
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


@pytest.mark.parametrize("words, vectors, expected", [
    (1, 3, [[0], [0], [0]]),  # one word: every vector is that word (diffusers' start)
    (2, 4, [[0], [0], [1], [1]]),  # more vectors: each word fills an equal share, in order
    (2, 3, [[0], [0], [1]]),
    (3, 3, [[0], [1], [2]]),
    (3, 1, [[0, 1, 2]]),  # fewer vectors: each is the mean of a consecutive part of the phrase
    (5, 2, [[0, 1, 2], [3, 4]]),
])
def test_which_words_each_vector_starts_from(words, vectors, expected):
    assert initializer_rows(words, vectors) == expected


@pytest.mark.parametrize("words, vectors", [(w, v) for w in range(1, 8) for v in range(1, 8)])
def test_every_word_is_used_and_the_order_kept(words, vectors):
    rows = initializer_rows(words, vectors)
    assert len(rows) == vectors and all(rows)
    flat = [j for row in rows for j in row]
    assert flat == sorted(flat) and set(flat) == set(range(words))  # no word dropped, phrase order kept
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1 or vectors >= words
    if vectors >= words:  # each word's share of the vectors differs by at most one
        shares = [flat.count(j) for j in range(words)]
        assert max(shares) - min(shares) <= 1


def test_start_vectors_from_the_embedding_table():
    table = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    single = initializer_vectors(table, [7], 3)
    assert single.dtype == np.float32 and single.shape == (3, 6)
    assert single.tobytes() == np.repeat(table[7][None], 3, axis=0).tobytes()  # bit-identical to one word today
    np.testing.assert_array_equal(initializer_vectors(table, [4, 9], 3), table[[4, 4, 9]])
    mean = initializer_vectors(table, [1, 2, 3], 1)
    np.testing.assert_allclose(mean[0], table[[1, 2, 3]].astype(np.float64).mean(axis=0), rtol=1e-6)
    two = initializer_vectors(table, [1, 2, 3, 4, 5], 2)
    np.testing.assert_allclose(two, [table[[1, 2, 3]].mean(axis=0), table[[4, 5]].mean(axis=0)], rtol=1e-6)


def test_a_phrase_of_vocabulary_words_gives_one_id_per_word(tokenizer):
    size = len(tokenizer)
    ids, init = add_placeholder_tokens(tokenizer, PLACEHOLDER, 2, "  red toy   car ")
    assert ids == [size, size + 1]
    assert init == [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("red", "toy", "car")]
    assert initializer_ids(tokenizer, "toy") == tokenizer.encode("toy", add_special_tokens=False)


@pytest.mark.parametrize("phrase, message", [
    ("red qzxvkjwplm car", r"--initializer_token 'red qzxvkjwplm car': its word 'qzxvkjwplm' is 8 tokens \(q z x"),
    ("<cat-toy>", r"--initializer_token '<cat-toy>': it is 5 tokens"),
    ("toy, car", r"its word 'toy,' is 2 tokens \(toy</w> ,</w>\)"),
    ("   ", "--initializer_token is empty"),
])
def test_unknown_words_and_an_empty_phrase_are_one_line_errors(tokenizer, phrase, message):
    size = len(tokenizer)
    with pytest.raises(UserError, match=message) as err:
        add_placeholder_tokens(tokenizer, PLACEHOLDER, 1, phrase)
    assert "\n" not in str(err.value)
    assert len(tokenizer) == size  # nothing added by a refused call


def tiny_token_table(pipeline):
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(pipeline, "text_encoder", "model.safetensors"))
    return next(v for k, v in weights.items() if k.endswith("token_embedding.weight")).astype(np.float32)


def test_the_trainer_starts_from_the_phrase(tiny_pipeline, train_images, tmp_path, tokenizer):
    """--learning_rate 0 exports the start vectors as they are: they are the rule's, from the model's table."""
    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, initializer_token="red toy car", num_vectors=2,
                                      learning_rate=0, max_train_steps=1, export_formats="diffusers"))
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("red", "toy", "car")]
    expected = initializer_vectors(tiny_token_table(tiny_pipeline), ids, 2)
    np.testing.assert_array_equal(read_vectors(os.path.join(out, "learned_embeds.safetensors")), expected)
