"""Aspect-ratio buckets (textual_inversion_core/data.py, run.host_batch/LatentCache): which buckets exist,
which bucket an image lands in, batches drawn from one bucket whatever the device split, crops, SDXL's
time_ids, the latent cache keyed by crop; then end to end in the PyTorch trainer: a mixed folder (portrait,
landscape, square, RGBA with a transparent background, captions with one missing) trains, resumes
exactly, and 2 processes equal 1."""

import math
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from bucket_data import BUCKET_FLAGS, MIXED_IMAGES, write_mixed_folder
from helpers import base_args, read_vectors, run_in_process, run_script, write_images
from textual_inversion_core import run
from textual_inversion_core.cli import parse_args
from textual_inversion_core.data import CROP_STEP, TextualInversionDataset, bucket_resolutions, load_image, nearest_bucket
from textual_inversion_core.errors import UserError

DATASET_BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def build(folder, **options):
    options.setdefault("size", 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = TextualInversionDataset(folder, seed=1234, repeats=options.pop("repeats", 3), **options)
    return dataset, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_folder(tmp_path_factory.mktemp("buckets") / "mixed")


def bucket_of(dataset, image_index):
    return dataset.buckets[dataset._bucket_of[image_index]]


# ---- Which buckets, and which bucket an image gets ----------------------------------------------------------

@pytest.mark.parametrize("resolution, low, high, step", [(512, 256, 1024, 64), (768, 256, 1536, 64), (64, 32, 128, 16),
                                                         (1024, 512, 2048, 64)])
def test_buckets_are_multiples_of_the_step_at_about_the_resolution_area(resolution, low, high, step):
    buckets = bucket_resolutions(resolution, low, high, step)
    assert (resolution // step * step,) * 2 in buckets
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert low <= width <= high and low <= height <= high
        assert resolution**2 - step * max(width, height) < width * height <= resolution**2  # about R^2, never more
        assert (height, width) in buckets  # every shape also turned by 90 degrees
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)


def test_kohya_defaults_at_512():
    assert bucket_resolutions(512, 256, 1024, 64) == [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
                                                      (576, 448), (640, 384), (768, 320), (1024, 256)]


@pytest.mark.parametrize("size, expected", [((300, 400), (448, 576)), ((400, 300), (576, 448)), ((1000, 1000), (512, 512)),
                                            ((1920, 1080), (640, 384)), ((100, 1000), (256, 1024)),
                                            # the log-ratio midpoint of 1:1 and 576:448 is 580.5:512
                                            ((580, 512), (512, 512)), ((581, 512), (576, 448))])
def test_each_image_gets_the_bucket_of_the_nearest_aspect_ratio(size, expected):
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert buckets[nearest_bucket(size, buckets)] == expected


def test_mixed_folder_buckets_pixels_and_summary(mixed):
    dataset, messages = build(mixed, **DATASET_BUCKETS)
    names = [os.path.basename(p) for p in dataset.image_paths]
    for index, name in enumerate(names):
        assert bucket_of(dataset, index) == MIXED_IMAGES[name][1], name
        width, height = bucket_of(dataset, index)
        for flipped in (False, True):
            example = dataset.draw(0)._replace(image=index, flipped=flipped, crop=dataset._crops[index][0])
            assert dataset.pixels(*dataset.latent_key(example)).shape == (3, height, width)
    assert dataset.bucket_counts() == {(48, 80): 2, (64, 64): 2, (80, 48): 1}
    summary = dataset.bucket_summary()
    assert summary[0].startswith("aspect-ratio buckets: 5 of about 64x64 pixels") and "3 hold the 5 images" in summary[0]
    assert "  48x80 (portrait, 0.60): 2 images" in summary and "  80x48 (landscape, 1.67): 1 image" in summary
    assert not [m for m in messages if "--enable_bucket" in m]


def test_a_range_that_leaves_only_the_square_is_warned(mixed):
    dataset, messages = build(mixed, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=64, bucket_reso_steps=16)
    assert dataset.buckets == [(64, 64)]
    warned = [m for m in messages if "--enable_bucket" in m]
    assert len(warned) == 1 and "the only bucket is the square" in warned[0] and "--max_bucket_reso 128" in warned[0]


# ---- Crops ---------------------------------------------------------------------------------------------------

def test_centre_and_random_crops(tmp_path):
    folder = str(tmp_path / "wide")
    os.makedirs(folder)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 160, 3), np.uint8)).save(f"{folder}/wide.png")
    centred, _ = build(folder, **DATASET_BUCKETS)
    # 160x64 (2.5) -> bucket 128x32 (4.0) would be farther than 80x48 (1.67): log-ratio distance.
    assert bucket_of(centred, 0) == (80, 48) and centred._images[0].shape == (48, 120, 3)
    assert centred._crops == [[(0, 20)]]  # the centred crop: (120 - 80) / 2
    randomised, _ = build(folder, random_crop=True, **DATASET_BUCKETS)
    assert randomised._crops[0] == [(0, left) for left in (0, 8, 16, 24, 32, 40)]  # multiples of 8 and the far edge
    drawn = {randomised.draw(i).crop for i in range(200)}
    assert drawn == set(randomised._crops[0])  # every crop is drawn
    example = randomised.draw(next(i for i in range(200) if randomised.draw(i).crop == (0, 8)))
    np.testing.assert_array_equal(randomised.pixels(0, False, (0, 8)),
                                  randomised._images[0][:, 8:88].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1)
    assert example.crop[1] % CROP_STEP == 0


def test_random_crop_without_buckets_is_a_random_square(tmp_path):
    folder = write_images(tmp_path / "data", count=1, size=(80, 96))
    dataset, _ = build(folder, random_crop=True)
    assert dataset.buckets == [(64, 64)] and dataset._images[0].shape == (64, 77, 3)
    assert dataset._crops[0] == [(0, 0), (0, 8), (0, 13)]
    assert {dataset.pixels(*dataset.latent_key(dataset.draw(i))).shape for i in range(20)} == {(3, 64, 64)}


# ---- Batches: one bucket each, the same whatever the split --------------------------------------------------

@pytest.mark.parametrize("per_device, devices, accumulation", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 3), (1, 3, 2)])
def test_every_global_batch_is_one_bucket_and_n_devices_draw_the_single_device_examples(mixed, per_device, devices,
                                                                                        accumulation):
    dataset, _ = build(mixed, **DATASET_BUCKETS)
    single = run.RunPlan(per_device * devices, 1, accumulation, len(dataset), 50, 1e-3)
    split = run.RunPlan(per_device, devices, accumulation, len(dataset), 50, 1e-3)
    assert single.global_batch == split.global_batch
    G = split.global_batch
    seen_buckets, seen_images = set(), set()
    for step in range(3 * math.ceil(len(dataset) / G)):
        examples = [dataset.draw(i, G) for micro in range(accumulation) for i in single.example_indices(step, micro, 0)]
        shared = [dataset.draw(i, G) for micro in range(accumulation) for d in range(devices)
                  for i in split.example_indices(step, micro, d)]
        assert sorted(examples) == sorted(shared)
        buckets = {bucket_of(dataset, e.image) for e in examples}
        assert len(buckets) == 1, (step, buckets)
        seen_buckets |= buckets
        seen_images |= {e.image for e in examples}
    assert seen_buckets == {(48, 80), (64, 64), (80, 48)} and seen_images == set(range(5))


def test_one_round_gives_each_image_its_repeats_and_fills_the_last_batch_of_a_bucket(mixed):
    dataset, _ = build(mixed, repeats=3, **DATASET_BUCKETS)
    G = 4  # buckets of 2, 2, 1 images x 3 repeats: 6, 6, 3 examples -> 2, 2, 1 batches of 4 = 20 draws a round
    images = [dataset.draw(i, G).image for i in range(20)]
    counts = np.bincount(images, minlength=5)
    for index in range(5):
        assert counts[index] >= 3  # every image at least its repeats
    assert counts.sum() == 20
    # A fresh dataset (a resumed run, another process) draws the same examples.
    again, _ = build(mixed, repeats=3, **DATASET_BUCKETS)
    assert [again.draw(i, G) for i in range(60)] == [dataset.draw(i, G) for i in range(60)]


def test_buckets_on_square_pictures_are_the_plain_run(tmp_path):
    """All pictures square: one bucket, the --resolution square, so the examples and pixels are the plain ones."""
    folder = str(tmp_path / "squares")
    write_images(folder, count=3, size=(90, 90))
    plain, _ = build(folder)
    bucketed, _ = build(folder, **DATASET_BUCKETS)
    assert bucketed.bucket_counts() == {(64, 64): 3}
    for index in range(40):
        drawn = bucketed.draw(index, 4)
        assert tuple(drawn[:3]) == plain.example(index) and drawn.crop == (0, 0)
        np.testing.assert_array_equal(bucketed.pixels(*bucketed.latent_key(drawn)), plain.pixels(*drawn[:2]))


def test_without_the_flags_pixels_are_load_image_and_examples_are_diffusers(mixed):
    dataset, _ = build(mixed)
    assert dataset.buckets is None and dataset.draw(5).crop is None
    for index, path in enumerate(dataset.image_paths):
        np.testing.assert_array_equal(dataset._images[index], load_image(path, 64, False))
    assert dataset.latent_key(dataset.draw(3)) == dataset.draw(3)[:2]


# ---- SDXL time_ids --------------------------------------------------------------------------------------------

def test_time_ids_without_buckets(tmp_path):
    folder = str(tmp_path / "data")
    os.makedirs(folder)
    Image.new("RGB", (100, 60), (200, 20, 20)).save(f"{folder}/wide.png")
    turned = Image.new("RGB", (90, 40), (20, 200, 20))  # stored 90x40, shown 40x90 (EXIF orientation 6)
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(f"{folder}/turned.jpg", exif=exif)
    plain, _ = build(folder)
    example = plain.draw(0)
    by_name = {os.path.basename(p): i for i, p in enumerate(plain.image_paths)}
    # The whole picture is resized to the square: nothing cut off, crop 0, 0; the true size, as shown.
    assert plain.time_ids(example._replace(image=by_name["wide.png"])).tolist() == [60, 100, 0, 0, 64, 64]
    assert plain.time_ids(example._replace(image=by_name["turned.jpg"])).tolist() == [90, 40, 0, 0, 64, 64]
    cropped, _ = build(folder, center_crop=True)
    wide = example._replace(image=by_name["wide.png"], flipped=False)
    # Short side 60 -> 64: the picture is 107x64 and its centred square starts at 20 * 64/60 = 21.
    assert cropped.time_ids(wide).tolist() == [60, 100, 0, 21, 64, 64]
    assert cropped.time_ids(wide._replace(flipped=True)).tolist() == [60, 100, 0, 22, 64, 64]  # 107 - 64 - 21
    assert cropped.time_ids(wide._replace(image=by_name["turned.jpg"])).tolist() == [90, 40, 40, 0, 64, 64]  # 25 * 1.6


def test_time_ids_with_buckets(mixed):
    dataset, _ = build(mixed, random_crop=True, **DATASET_BUCKETS)
    for index in range(60):
        drawn = dataset.draw(index, 2)
        width, height = dataset.original_sizes[drawn.image]
        bucket_w, bucket_h = bucket_of(dataset, drawn.image)
        top, left = drawn.crop
        resized_w = dataset._images[drawn.image].shape[1]
        expected_left = resized_w - bucket_w - left if drawn.flipped else left
        assert dataset.time_ids(drawn).tolist() == [height, width, top, expected_left, bucket_h, bucket_w]
    assert {dataset.draw(i, 2).crop for i in range(60)} > {(0, 0)}  # some crops are not at the corner


def test_host_batch_fields_and_shapes(mixed):
    dataset, _ = build(mixed, **DATASET_BUCKETS)
    plan = run.RunPlan(2, 1, 2, len(dataset), 10, 1e-3)

    def encode(pixels):
        return [p[:1, ::2, ::2] for p in pixels], [p[:1, ::2, ::2] * 0 + 1 for p in pixels]

    cache = run.LatentCache(dataset, encode)
    shapes = set()
    for step in range(5):
        batch = run.host_batch(plan, dataset, cache, 7, step, 0)
        assert set(batch) == {"mean", "std", "noise_seed", "prompt", "time_ids"}  # no mask without a masked loss
        assert batch["time_ids"].shape == (2, 2, 6) and batch["time_ids"].dtype == np.int64
        height, width = batch["mean"].shape[-2] * 2, batch["mean"].shape[-1] * 2
        assert (batch["time_ids"][..., 4:] == [height, width]).all()  # the target size is the batch's bucket
        shapes.add((width, height))
    assert len(shapes) > 1


def test_latent_cache_is_keyed_by_crop_and_frees_the_encoder_when_every_crop_is_cached(tmp_path):
    folder = str(tmp_path / "wide")
    os.makedirs(folder)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 90, 3), np.uint8)).save(f"{folder}/w.png")
    dataset, _ = build(folder, random_crop=True, **DATASET_BUCKETS)
    crops = dataset._crops[0]
    assert len(crops) == 3 and dataset.num_latent_keys == 6
    calls, freed = [], []

    def encode(pixels):
        calls.append(len(pixels))
        return list(pixels), [p * 0 for p in pixels]

    cache = run.LatentCache(dataset, encode, on_full=lambda: freed.append(True))
    keys = [(0, False, crops[0]), (0, False, crops[2]), (0, True, crops[0])]
    mean, _ = cache(keys)
    assert calls == [1, 1, 1] and not freed  # one picture per encode call
    np.testing.assert_array_equal(mean[1], dataset.pixels(0, False, crops[2]))
    assert not np.array_equal(mean[0], mean[1])
    cache([(0, flip, crop) for flip in (False, True) for crop in crops])
    assert calls == [1] * 6 and freed == [True]


# ---- Flags ----------------------------------------------------------------------------------------------------

def flags(**overrides):
    argv = ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--placeholder_token=<t>", "--initializer_token=toy",
            "--resolution=64"] + [f"--{k}" if v is True else f"--{k}={v}" for k, v in overrides.items()]
    return parse_args(argv)


@pytest.mark.parametrize("overrides, message", [
    (dict(bucket_reso_steps=12), "--bucket_reso_steps must be a positive multiple of 8"),
    (dict(min_bucket_reso=40, max_bucket_reso=128, bucket_reso_steps=16), "--min_bucket_reso 40 is not a multiple of "
                                                                          "--bucket_reso_steps 16; use 32"),
    (dict(), "--resolution 64 is outside the bucket sides --min_bucket_reso 256 to --max_bucket_reso 1024"),
    (dict(random_crop=True, center_crop=True), "--random_crop and --center_crop ask for two different crops"),
])
def test_bucket_flag_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        flags(enable_bucket=True, **overrides)
    assert "\n" not in str(err.value)


# ---- End to end: the PyTorch trainer ---------------------------------------------------------------------------

STEPS = 4
RUN_FLAGS = dict(BUCKET_FLAGS, random_crop=True, alpha_mask=True, caption_extension=".txt", repeats=1,
                 max_train_steps=STEPS, num_vectors=2)


@pytest.fixture(scope="module")
def single_run(tiny_pipeline, mixed, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bucket-run") / "single")
    result = run_in_process(base_args(tiny_pipeline, mixed, out, train_batch_size=2, checkpointing_steps=2, **RUN_FLAGS))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.mark.slow
def test_mixed_folder_trains_with_its_bucket_summary_and_warnings(single_run, mixed):
    out, result = single_run
    lines = result.stderr.splitlines()
    assert any(line.startswith("aspect-ratio buckets: 5 of about 64x64 pixels") for line in lines), result.stderr[-3000:]
    assert "  80x48 (landscape, 1.67): 1 image" in lines
    warned = [line for line in lines if "warning:" in line]
    assert sum("have no .txt caption file" in w and "landscape_0.png" in w for w in warned) == 1
    assert sum("have no alpha channel and are trained unmasked" in w for w in warned) == 1
    vectors = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()
    # With --repeats 1 a round is one global batch per bucket: the 4 steps trained at all three bucket shapes.
    dataset, _ = build(mixed, repeats=1, random_crop=True, **DATASET_BUCKETS)
    assert len({bucket_of(dataset, dataset.draw(i, 2).image) for i in range(2 * STEPS)}) == 3


@pytest.mark.slow
def test_mixed_folder_resumes_exactly(single_run, tiny_pipeline, mixed, tmp_path):
    out, _ = single_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = run_in_process(base_args(tiny_pipeline, mixed, resumed, train_batch_size=2, resume_from_checkpoint="latest",
                                      **RUN_FLAGS))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr
    np.testing.assert_array_equal(read_vectors(os.path.join(resumed, "learned_embeds.safetensors")),
                                  read_vectors(os.path.join(out, "learned_embeds.safetensors")))


@pytest.mark.slow
def test_mixed_folder_on_two_processes_equals_one(single_run, tiny_pipeline, mixed, tmp_path):
    out, _ = single_run
    double = str(tmp_path / "double")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script(base_args(tiny_pipeline, mixed, double, train_batch_size=1, **RUN_FLAGS), launcher=torchrun,
                        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    assert "processes = 2" in result.stderr
    assert sum(line.startswith("aspect-ratio buckets:") for line in result.stderr.splitlines()) == 1  # first rank only
    a, b = (read_vectors(os.path.join(d, "learned_embeds.safetensors")) for d in (out, double))
    assert float(np.abs(a - b).max()) <= 1e-6  # the gradient all-reduce's summation order, as in test_multiprocess
