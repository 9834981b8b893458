"""Logging and progress artefacts: TensorBoard events (read back with tensorboard's own reader),
loss.png, the validation grid, and one-line errors for trackers that are not installed."""

import io
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import base_args, run_in_process
from textual_inversion_core import plots
from textual_inversion_core.errors import UserError
from textual_inversion_core.schedules import lr_multiplier

STEPS = 2
IMAGES = 1  # validation images per round: sampling is the slow part of this test
BASE_LR = 5e-3


@pytest.fixture(scope="module")
def logged_run(tiny_pipeline, train_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("logged") / "out"
    argv = base_args(tiny_pipeline, train_images, str(out), max_train_steps=STEPS, learning_rate=BASE_LR,
                     lr_scheduler="linear", lr_warmup_steps=0, report_to="tensorboard",
                     validation_prompt="a photo of <cat-toy>", validation_steps=1, num_validation_images=IMAGES)
    result = run_in_process(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    for root, _, names in os.walk(logdir):
        for name in names:
            if not name.startswith("events.out.tfevents"):
                continue
            events = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0, "images": 0})
            events.Reload()
            for tag in events.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
            for tag in events.Tags()["images"]:
                images.setdefault(tag, []).extend(events.Images(tag))
    return scalars, images


def test_tensorboard_holds_loss_lr_and_validation_images(logged_run):
    scalars, images = read_events(logged_run / "logs")
    assert [s for s, _ in scalars["loss"]] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["loss"])
    expected_lr = [BASE_LR * lr_multiplier("linear", step, 0, STEPS, 1, BASE_LR) for step in range(STEPS)]
    assert [s for s, _ in scalars["lr"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["lr"]], expected_lr, rtol=1e-6)
    assert len(set(v for _, v in scalars["lr"])) > 1  # the schedule really moved
    logged = images["validation"]
    assert [e.step for e in logged] == [1, 2]
    for event in logged:
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        saved = [np.asarray(Image.open(logged_run / "validation" / f"step-{event.step:06d}-{i}.png").convert("RGB"))
                 for i in range(IMAGES)]
        # TensorBoard tiles the batch side by side: the same pixels as the PNGs on disk.
        np.testing.assert_array_equal(decoded, np.concatenate(saved, axis=1))


def test_loss_png_is_written(logged_run):
    path = logged_run / "loss.png"
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 450)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    blue = np.all(pixels == (31, 119, 180), axis=1).sum()
    assert blue > 50, "the smoothed loss line is missing"


def test_validation_grid_over_steps(logged_run, tmp_path):
    path = plots.write_validation_grid(str(logged_run / "validation"), str(tmp_path / "grid.png"), cell=64)
    with Image.open(path) as grid:
        grid = np.asarray(grid.convert("RGB"))
    gap, label = 4, 80
    assert grid.shape == (STEPS * (64 + gap) + gap, label + IMAGES * (64 + gap) + gap, 3)
    for row, step in enumerate(range(1, STEPS + 1)):  # one row per validation step, oldest first
        saved = np.asarray(Image.open(logged_run / "validation" / f"step-{step:06d}-0.png").convert("RGB"))
        top = gap + row * (64 + gap)
        np.testing.assert_array_equal(grid[top:top + 64, label + gap:label + gap + 64], saved)
    assert plots.write_validation_grid(str(tmp_path / "none"), str(tmp_path / "empty.png")) is None


def test_loss_curve_edge_cases(tmp_path):
    for name, steps, losses in [("one", [1], [0.5]), ("flat", [1, 2, 3], [0.2, 0.2, 0.2]),
                                ("nan", [1, 2, 3], [0.3, float("nan"), 0.1]), ("empty", [], [])]:
        path = plots.write_loss_curve(str(tmp_path / f"{name}.png"), steps, losses)
        with Image.open(path) as image:
            image.verify()
    assert sorted(os.listdir(tmp_path)) == ["empty.png", "flat.png", "nan.png", "one.png"]  # no temp files left


@pytest.mark.parametrize("tracker", ["wandb", "comet_ml"])
def test_missing_tracker_is_a_one_line_error(tracker, tiny_pipeline, train_images, tmp_path, monkeypatch):
    import textual_inversion

    # A None entry in sys.modules makes the package look absent even where it is installed.
    monkeypatch.setitem(sys.modules, tracker, None)
    argv = base_args(tiny_pipeline, train_images, str(tmp_path / "out"), report_to=tracker)
    with pytest.raises(UserError) as info:
        textual_inversion.main(argv)
    message = str(info.value)
    assert f"--report_to {tracker} needs the {tracker} package" in message
    assert "--report_to none" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "out" / "logs")
