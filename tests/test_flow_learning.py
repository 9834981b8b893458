"""Proof that textual_inversion.py learns a concept on a flow-matching model (SD3), end to end, offline on CPU.

tests/assets/shapes-sd3 is a StableDiffusion3Pipeline (an SD3 transformer, CLIP-L-, CLIP-G- and T5-like encoders)
pretrained by `tools/pretrain_shapes_model.py --family sd3` on the shapes world, with the same two pairs never shown
as tests/assets/shapes-sd (see its pretraining.json). For each held-out pair, with the token in the CLIP encoders
only and in T5 too, textual_inversion.py trains a new token initialised from "shape" on five images of the pair with
tools/shapes.FLOW_RECIPE (the SD recipe, not tuned for this model); the saved embedding set, loaded into the
pipeline by load_embedding_into_pipeline as users load it, must
  1. lower the velocity loss on fresh images of the pair below that of "a photo of a shape" (paired draws), and
  2. make samples the judge reads as the pair far more often than "shape" does.
The initializer's own numbers (where the token starts) must fail the same thresholds: the claims can fail. The
thresholds (tools/shapes.FLOW_LEARNED, one set per pair and setting) were set from several seeds; see there and
bench/learning_results.md (sd3 rows).
"""

import os

import pytest

from conftest import REPO
from test_learning import measure, train

ASSET = os.path.join(REPO, "tests", "assets", "shapes-sd3")


# (held-out pair, setting): "sd3" is the trainer's default for SD3, the token in both CLIP encoders while T5 reads the
# prompt as text (cached, freed); "sd3+t5" adds --enable_t5_ti, the token in T5 too. bench/learning_curves.py's names.
CASES = [(concept, setting) for concept in ("purple star", "green triangle") for setting in ("sd3", "sd3+t5")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case).replace(" ", "-") for case in CASES])
def learned(request, tmp_path_factory):
    from tools import shapes

    concept, setting = request.param
    pair = shapes.parse_concept(concept)
    flags = {"enable_t5_ti": True} if setting == "sd3+t5" else {}
    embedding = train(tmp_path_factory.mktemp("flow-learning"), asset=ASSET, recipe=shapes.FLOW_RECIPE, concept=pair,
                      **flags)
    return request.param, measure(embedding, asset=ASSET, concept=pair)


def test_learned_token_lowers_the_flow_loss_and_generates_the_concept(learned):
    from tools import shapes

    case, numbers = learned
    assert shapes.learning_shortfalls(numbers, shapes.FLOW_LEARNED[case]) == []


def test_control_the_initializer_alone_fails_the_same_claims(learned):
    from tools import shapes

    case, numbers = learned
    start = dict(numbers, loss_token=numbers["loss_initializer"], rate_token=numbers["rate_initializer"])
    shortfalls = shapes.learning_shortfalls(start, shapes.FLOW_LEARNED[case])
    assert len(shortfalls) == 3, shortfalls
