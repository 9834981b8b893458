"""Flags of the shared parser that JAX cannot honour are refused in one line, before any model loads."""

import pytest

import textual_inversion_flax as ti_flax
from helpers import FLAX_SCRIPT, flax_base_args, run_script
from textual_inversion_core.errors import UserError


@pytest.mark.parametrize("extra, message", [
    ({"mixed_precision": "fp16"}, "use --mixed_precision bf16"),
    ({"gradient_checkpointing": True}, "--gradient_checkpointing is not available in the Flax trainer"),
    ({"use_8bit_adam": True}, "--use_8bit_adam is not available in the Flax trainer"),
    ({"local_rank": 0}, "set by torch launchers"),
    ({"report_to": "comet_ml"}, "comet_ml is not supported by the Flax trainer"),
])
def test_flags_without_a_jax_meaning_are_refused(extra, message, tmp_path, train_images):
    argv = flax_base_args(str(tmp_path / "no-model"), train_images, str(tmp_path / "out"), **extra)
    with pytest.raises(UserError, match=message):
        ti_flax.main(argv)


def test_refusal_is_one_line_with_exit_code_2(tmp_path, train_images):
    """The script as users run it: run_cli turns the UserError into one stderr line and exit code 2."""
    out = tmp_path / "out"
    argv = flax_base_args(str(tmp_path / "no-model"), train_images, str(out), mixed_precision="fp16")
    proc = run_script(argv, FLAX_SCRIPT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("textual_inversion_flax.py: error: --mixed_precision fp16")
    assert not out.exists()  # refused before anything touched the disk


def test_not_a_pipeline_folder_is_one_clear_error(tmp_path, train_images):
    (tmp_path / "empty-model").mkdir()
    argv = flax_base_args(str(tmp_path / "empty-model"), train_images, str(tmp_path / "out"))
    with pytest.raises(UserError, match="is not a Stable Diffusion pipeline folder"):
        ti_flax.main(argv)
