"""Training images, prompt templates and the order in which examples are drawn.

Framework-free (numpy and PIL). Every random choice of an example (which image, flipped or not,
which template) is a pure function of (seed, global example index). That makes a resumed run draw
exactly what the uninterrupted run would have drawn, and lets N processes split one global batch
so that their union equals the single-process batch.
"""

import concurrent.futures
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

# Prompt templates of the original Textual Inversion work, as used by diffusers' example script.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".pjpeg", ".pjp",
    ".ppm", ".pgm", ".pbm", ".tga", ".heic", ".avif",
}

# Streams of per-example randomness; framework code draws noise/timesteps from its own streams.
STREAM_ORDER, STREAM_AUGMENT, STREAM_NOISE = 0, 1, 2


def templates_for(learnable_property):
    return STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES


def example_seed(seed, global_index, stream):
    """A 63-bit seed for one example's random draws, independent of process count and of resume."""
    state = np.random.SeedSequence([int(seed), int(stream), int(global_index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _to_rgb(image):
    """Any PIL mode to 8-bit RGB: transparency over white, 16-bit scaled (not clipped), CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() > 1.0 else 1.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path, resolution, center_crop):
    """Decode one image and return it as uint8 [resolution, resolution, 3], as diffusers prepares it.

    EXIF orientation is applied; JPEG decoding is downscaled early (draft) so a huge photo does not
    occupy gigabytes; the crop/resize follow diffusers' TextualInversionDataset (centre crop to the
    short side if asked, then a bicubic resize to a square).
    """
    with Image.open(path) as image:
        if image.format == "JPEG":
            # Decode at >= 2x the target size: keeps quality, bounds memory for 8000x8000 photos.
            image.draft("RGB", (resolution * 2, resolution * 2))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    if center_crop:
        w, h = image.size
        crop = min(w, h)
        left, top = (w - crop) // 2, (h - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    image = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


def find_images(train_data_dir):
    """Sorted image files of a folder. Hidden files, folders and non-image files are passed over."""
    if not train_data_dir:
        raise UserError("--train_data_dir is required: a folder with 3-5 images of the concept")
    if not os.path.exists(train_data_dir):
        raise UserError(f"--train_data_dir {train_data_dir!r} does not exist; point it at a folder of images")
    if not os.path.isdir(train_data_dir):
        raise UserError(f"--train_data_dir {train_data_dir!r} is a file, not a folder; put the images in a folder and pass that")
    candidates, skipped = [], []
    for name in sorted(os.listdir(train_data_dir)):
        path = os.path.join(train_data_dir, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            candidates.append(path)
            continue
        try:  # no image extension: keep it only if PIL recognises the content
            with Image.open(path) as probe:
                probe.size
            candidates.append(path)
        except (UnidentifiedImageError, OSError, ValueError):
            skipped.append(name)
    if skipped:
        warnings.warn(f"skipping {len(skipped)} non-image file(s) in {train_data_dir}: {', '.join(skipped[:5])}")
    if not candidates:
        raise UserError(f"--train_data_dir {train_data_dir!r} contains no image files; add .jpg/.png images of the concept")
    return candidates


class TextualInversionDataset:
    """The training images (decoded once, both flips) and tokenised prompt templates.

    ``example(global_index)`` says what the i-th drawn example is (image, flip, template); ``pixels``
    gives an image in [-1, 1], CHW float32; ``prompt_ids`` the token ids of a template. Indexing the
    dataset (``dataset[i]``) returns all of it as numpy arrays, like the diffusers dataset returns
    tensors.
    """

    def __init__(self, data_root, tokenizer=None, placeholder_string=None, learnable_property="object", size=512,
                 repeats=100, flip_p=0.5, center_crop=False, seed=0, num_workers=0, skip_bad_images=False):
        self.size = size
        self.flip_p = flip_p
        self.seed = int(seed)
        self.templates = templates_for(learnable_property)
        self.placeholder_string = placeholder_string
        paths = find_images(data_root)
        images, self.image_paths = self._decode_all(paths, size, center_crop, num_workers, skip_bad_images)
        self._images = images
        self.num_images = len(images)
        self.num_examples = self.num_images * repeats
        self._order_cache = {}
        self.prompts, self._prompt_ids = None, None
        if tokenizer is not None:
            self.tokenize(tokenizer, placeholder_string)

    def tokenize(self, tokenizer, placeholder_string):
        """Fill the templates with the placeholder string and tokenise all of them once."""
        self.placeholder_string = placeholder_string
        self.prompts = [t.format(placeholder_string) for t in self.templates]
        self._prompt_ids = np.asarray(
            tokenizer(self.prompts, padding="max_length", truncation=True,
                      max_length=tokenizer.model_max_length).input_ids, dtype=np.int64)

    @property
    def all_prompt_ids(self):
        """[num_templates, max_length] int64 token ids of every template."""
        return self._prompt_ids

    @staticmethod
    def _decode_all(paths, size, center_crop, num_workers, skip_bad_images):
        def decode(path):
            try:
                return load_image(path, size, center_crop), None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                return None, err

        if num_workers > 0:
            with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
                results = list(pool.map(decode, paths))
        else:
            results = [decode(p) for p in paths]
        images, kept = [], []
        for path, (array, err) in zip(paths, results):
            if array is None:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                if not skip_bad_images:
                    raise UserError(f"cannot read image {path!r} ({reason}); remove or re-save it, or pass --skip_bad_images")
                warnings.warn(f"skipping unreadable image {path}: {reason}")
                continue
            images.append(array)
            kept.append(path)
        if not images:
            raise UserError(f"none of the {len(paths)} image files in the data folder could be read; check the files")
        return images, kept

    def __len__(self):
        return self.num_examples

    def _epoch_order(self, epoch):
        order = self._order_cache.get(epoch)
        if order is None:
            rng = np.random.default_rng(example_seed(self.seed, epoch, STREAM_ORDER))
            order = rng.permutation(self.num_examples) % self.num_images
            self._order_cache = {epoch: order}  # one epoch at a time is all a run needs
        return order

    def example(self, global_index):
        """(image_index, flipped, template_index) of the global_index-th example drawn in training."""
        epoch, position = divmod(int(global_index), self.num_examples)
        image_index = int(self._epoch_order(epoch)[position])
        rng = np.random.default_rng(example_seed(self.seed, global_index, STREAM_AUGMENT))
        flipped = bool(rng.random() < self.flip_p)
        template_index = int(rng.integers(len(self.templates)))
        return image_index, flipped, template_index

    def pixels(self, image_index, flipped):
        image = self._images[image_index]
        if flipped:
            image = image[:, ::-1]
        array = image.astype(np.float32) / 127.5 - 1.0
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def prompt_ids(self, template_index):
        if self._prompt_ids is None:
            raise ValueError("dataset was built without a tokenizer")
        return self._prompt_ids[template_index]

    def __getitem__(self, global_index):
        image_index, flipped, template_index = self.example(global_index)
        item = {"pixel_values": self.pixels(image_index, flipped), "image_index": image_index,
                "flipped": flipped, "template_index": template_index}
        if self.prompts is not None:
            item["text"] = self.prompts[template_index]
        if self._prompt_ids is not None:
            item["input_ids"] = self.prompt_ids(template_index)
        return item


def placeholder_tokens_for(placeholder_token, num_vectors):
    """The tokens added to the tokenizer: <tok>, <tok>_1, ..., <tok>_{n-1} (diffusers' naming)."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
