"""--use_8bit_adam (bitsandbytes' AdamW8bit): a checkpoint holds the optimizer's own state, in both of its layouts
(float32 moments for a vector set under 4096 values, uint8 codes with per-block scales from 4096 on), and a resumed
run equals the uninterrupted one bit for bit; a checkpoint of the other optimizer is refused in one line before any
model loads.

bitsandbytes is a test dependency (requirements-dev.txt) whose AdamW8bit runs on CPU. The trainer refuses
--use_8bit_adam without CUDA; these tests run it in-process with that guard (torch_backend.optimizer.cuda_available)
patched, so users keep the refusal (tested in test_sdxl.py)."""

import os
import shutil

import numpy as np
import pytest

from helpers import base_args, read_vectors
from textual_inversion_core import checkpoints, run
from textual_inversion_core.cli import parse_args
from textual_inversion_core.errors import UserError

# SDXL with 86 vectors: text_encoder's set is 86 x 32 = 2752 values (float32 state), text_encoder_2's 86 x 48 = 4128
# (uint8 state), as real SDXL with 4 vectors: CLIP-L 4 x 768 = 3072, bigG 4 x 1280 = 5120.
# SD-1.x with 2 vectors: 2 x 32 values, float32 state.
SETTINGS = dict(train_batch_size=2, max_train_steps=4, checkpointing_steps=2, use_8bit_adam=True)
CASES = {"sd": dict(num_vectors=2), "sdxl": dict(num_vectors=86)}
BLOCK = 256  # bitsandbytes' block of values sharing one absmax


def bitsandbytes_on_cpu():
    """bitsandbytes, checked to run AdamW8bit steps on CPU in both state layouts; a clear failure otherwise."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        pytest.fail("bitsandbytes is not installed: pip install -r requirements-dev.txt (it pins the tested release)")
    import torch

    small, large = torch.nn.Parameter(torch.ones(2, 32)), torch.nn.Parameter(torch.ones(86, 48))
    try:
        optimizer = bnb.optim.AdamW8bit([small, large], lr=1e-3)
        for _ in range(2):
            small.grad, large.grad = torch.full_like(small, 0.5), torch.full_like(large, 0.5)
            optimizer.step()
    except Exception as err:  # a release or build whose CPU kernels lack an op
        pytest.fail(f"bitsandbytes {bnb.__version__} cannot run AdamW8bit on CPU here ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); these tests need its CPU kernels")
    assert optimizer.state[large]["state1"].dtype == torch.uint8 and optimizer.state[small]["state1"].dtype == torch.float32


@pytest.fixture(scope="module")
def runs_8bit(tiny_pipeline, tiny_sdxl_pipeline, train_images, tmp_path_factory):
    """Per case: an uninterrupted run checkpointed at steps 2 and 4, and a run resumed from its checkpoint-2."""
    bitsandbytes_on_cpu()
    import textual_inversion
    from torch_backend import optimizer as topt

    pipelines = {"sd": tiny_pipeline, "sdxl": tiny_sdxl_pipeline}
    root = tmp_path_factory.mktemp("adam8bit")
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(topt, "cuda_available", lambda: True)
        for case, options in CASES.items():
            full, resumed = str(root / case / "full"), str(root / case / "resumed")
            argv = base_args(pipelines[case], train_images, full, **SETTINGS, **options)
            assert textual_inversion.main(argv) == 0
            shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
            argv = base_args(pipelines[case], train_images, resumed, resume_from_checkpoint="latest", **SETTINGS,
                             **options)
            assert textual_inversion.main(argv) == 0
            out[case] = {"full": full, "resumed": resumed}
    return out


def test_checkpoints_hold_adamw8bit_state_in_both_layouts(runs_8bit):
    tensors, state = checkpoints.load_checkpoint(os.path.join(runs_8bit["sdxl"]["full"], "checkpoint-2"))
    assert state["optimizer"] == "adamw8bit" and state["optimizer_step"] == 2.0
    assert not any(name.startswith("exp_avg") for name in tensors)  # AdamW's names are not reused
    # text_encoder's 2752 values: 32-bit state, the moments themselves
    assert {k for k in tensors if not k.endswith("_2")} == {"vectors", "bnb_state1", "bnb_state2"}
    assert tensors["bnb_state1"].dtype == np.float32 and tensors["bnb_state1"].shape == (86, 32)
    assert np.abs(tensors["bnb_state1"]).max() > 0 and tensors["bnb_state2"].min() >= 0
    # text_encoder_2's 4128 values: uint8 codes, the two 256-value maps and one float32 absmax per block of 256
    blocks = -(-86 * 48 // BLOCK)
    for moment in ("1", "2"):
        assert tensors[f"bnb_state{moment}_2"].dtype == np.uint8 and tensors[f"bnb_state{moment}_2"].shape == (86, 48)
        assert tensors[f"bnb_qmap{moment}_2"].shape == (256,) and tensors[f"bnb_qmap{moment}_2"].dtype == np.float32
        assert tensors[f"bnb_absmax{moment}_2"].shape == (blocks,) and tensors[f"bnb_absmax{moment}_2"].max() > 0
    sd_tensors, _ = checkpoints.load_checkpoint(os.path.join(runs_8bit["sd"]["full"], "checkpoint-2"))
    assert sorted(sd_tensors) == ["bnb_state1", "bnb_state2", "vectors"] and sd_tensors["bnb_state1"].shape == (2, 32)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_the_uninterrupted_run_bit_for_bit(runs_8bit, case):
    full, resumed = runs_8bit[case]["full"], runs_8bit[case]["resumed"]
    names = ["learned_embeds.safetensors"] + (["learned_embeds_2.safetensors"] if case == "sdxl" else [])
    for name in names:
        a, b = read_vectors(os.path.join(full, name)), read_vectors(os.path.join(resumed, name))
        assert np.array_equal(a, b), (name, float(np.abs(a - b).max()))
    # and the optimizer state after the resumed steps: the same codes, scales and moments
    want, _ = checkpoints.load_checkpoint(os.path.join(full, "checkpoint-4"))
    got, state = checkpoints.load_checkpoint(os.path.join(resumed, "checkpoint-4"))
    assert sorted(got) == sorted(want) and state["optimizer"] == "adamw8bit"
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


@pytest.fixture
def no_model_loading_8bit(no_model_loading, monkeypatch):
    """no_model_loading (helpers.py), with the CUDA guard of --use_8bit_adam passed."""
    from torch_backend import optimizer as topt

    monkeypatch.setattr(topt, "cuda_available", lambda: True)


def adamw_checkpoint(output_dir, framework, with_optimizer_key=True):
    """A checkpoint-2 as the AdamW trainers write it (framework "pytorch" or "flax"; without the optimizer key: as
    written before 8-bit checkpoints existed)."""
    args = parse_args(base_args("model", "data", output_dir, num_vectors=2))
    plan = run.make_plan(args, 4, 1)
    vectors = [np.ones((2, 32), np.float32)]
    adam = [run.AdamMoments(np.full((2, 32), 0.1, np.float32), np.full((2, 32), 0.01, np.float32), 2)]
    tensors, state = run.checkpoint_payload(vectors, adam, 1234, args, plan, framework)
    if not with_optimizer_key:
        del state["optimizer"]
    checkpoints.save_checkpoint(output_dir, 2, tensors, state)


@pytest.mark.parametrize("framework, with_optimizer_key", [("pytorch", True), ("flax", True), ("pytorch", False)])
def test_adamw_checkpoint_with_use_8bit_adam_is_refused_before_any_model_loads(
        tiny_pipeline, train_images, tmp_path, no_model_loading_8bit, framework, with_optimizer_key):
    import textual_inversion

    out = str(tmp_path / "out")
    adamw_checkpoint(out, framework, with_optimizer_key)
    bitsandbytes_on_cpu()
    with pytest.raises(UserError, match=rf"holds AdamW state \({framework} trainer\) but this run uses bitsandbytes' "
                                        r"AdamW8bit \(--use_8bit_adam\); resume without --use_8bit_adam") as info:
        textual_inversion.main(base_args(tiny_pipeline, train_images, out, resume_from_checkpoint="latest",
                                         num_vectors=2, **SETTINGS))
    assert "\n" not in str(info.value)


def test_8bit_checkpoint_without_the_flag_is_refused_in_both_trainers(runs_8bit, tiny_sdxl_pipeline, train_images,
                                                                      tmp_path, no_model_loading_8bit):
    import textual_inversion
    from textual_inversion_core.preflight import load_run_inputs

    out = str(tmp_path / "out")
    shutil.copytree(os.path.join(runs_8bit["sdxl"]["full"], "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    argv = base_args(tiny_sdxl_pipeline, train_images, out, resume_from_checkpoint="latest",
                     **dict(SETTINGS, use_8bit_adam=False), **CASES["sdxl"])
    needle = (r"holds bitsandbytes' AdamW8bit \(--use_8bit_adam\) state \(pytorch trainer\) but this run uses "
              r"AdamW; resume with textual_inversion.py --use_8bit_adam or start a new --output_dir")
    with pytest.raises(UserError, match=needle) as info:
        textual_inversion.main(argv)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=needle):  # textual_inversion_flax.py's check: its optimizer is AdamW
        load_run_inputs(parse_args(argv))
