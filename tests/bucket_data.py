"""The mixed training folder of the bucket and mask tests of both suites (tests/ and tests/flax/): portrait,
landscape and square pictures, one RGBA picture with a transparent background, sidecar captions with
one missing. Only numpy and PIL, so it loads in either environment."""

import os

import numpy as np

# The bucket flags the tests train with at --resolution 64: buckets 32x128, 48x80, 64x64, 80x48, 128x32.
BUCKET_FLAGS = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16}

# file name -> (width, height); the bucket each lands in at --resolution 64 with BUCKET_FLAGS.
MIXED_IMAGES = {
    "portrait_0.png": ((60, 100), (48, 80)),
    "portrait_1.png": ((52, 90), (48, 80)),
    "landscape_0.png": ((104, 62), (80, 48)),
    "square_0.png": ((70, 70), (64, 64)),
    "rgba_0.png": ((72, 72), (64, 64)),
}
CAPTIONS = {"portrait_0": "a toy on green grass", "portrait_1": "<cat-toy> asleep on a red sofa",
            "square_0": "a toy in the snow", "rgba_0": "a toy, cut out"}  # landscape_0 has no caption file


def picture(size, seed):
    """A smooth RGB picture of (width, height), uint8 [height, width, 3]."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (min(size) / 3) ** 2))[..., None]
    return (blob * rng.uniform(0, 255, 3) + (1 - blob) * 255 * rng.uniform(0, 1, 3)).astype(np.uint8)


def cutout_alpha(size):
    """uint8 [height, width] alpha: an opaque disc in the middle, the rest fully transparent."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    return np.where((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(size) / 3) ** 2, 255, 0).astype(np.uint8)


def write_mixed_folder(folder):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for seed, (name, (size, _)) in enumerate(MIXED_IMAGES.items()):
        pixels = picture(size, seed)
        if name.startswith("rgba"):
            Image.fromarray(np.dstack([pixels, cutout_alpha(size)]), mode="RGBA").save(os.path.join(folder, name))
        else:
            Image.fromarray(pixels).save(os.path.join(folder, name))
    for stem, text in CAPTIONS.items():
        with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return str(folder)
