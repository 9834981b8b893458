"""Fixtures of the PyTorch suite (run in .venv). They and the helpers are defined once, in helpers.py,
for this suite and tests/flax/."""

from helpers import (
    REPO,
    TORCH_SCRIPT,
    base_args,
    no_model_loading,
    run_script,
    tiny_clip,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    train_images,
    write_images,
)

# Test modules may still import these from conftest; TRAIN_SCRIPT is the PyTorch trainer.
TRAIN_SCRIPT = TORCH_SCRIPT
__all__ = ["REPO", "TRAIN_SCRIPT", "base_args", "no_model_loading", "run_script", "tiny_clip", "tiny_flux_pipeline",
           "tiny_pipeline", "tiny_sd3_pipeline", "tiny_sdxl_pipeline", "train_images", "write_images"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (fault injection, multi-process); still run by make test")
