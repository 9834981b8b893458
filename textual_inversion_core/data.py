"""Training images, prompt templates and the order in which examples are drawn.

Framework-free (numpy and PIL). Every random choice of an example (which image, flipped or not,
which template) is a pure function of (seed, global example index). That makes a resumed run draw
exactly what the uninterrupted run would have drawn, and lets N processes split one global batch
so that their union equals the single-process batch.

Captions (sidecar files or file names) and prompt-template files make the prompt depend on the image:
all_prompt_ids then holds one row per distinct (image, template) prompt, and example() maps the same
keyed template draw to that image's row. Without them the rows are the built-in templates, as before.

Aspect-ratio buckets (--enable_bucket) keep each picture near its own shape: it is resized to cover its
bucket and cropped per example (the crop drawn after diffusers' draws), and with several buckets in use
each global batch is drawn from one bucket (draw(index, global_batch)). Masks (--alpha_mask, --masked_loss)
are per-image weight maps with the stored pixels' geometry, cropped and flipped with them and averaged
down to latent resolution. Without these flags pixels, draws and prompts are exactly as before.
"""

import collections
import concurrent.futures
import math
import os
import re
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
# Order of the global batches over aspect-ratio buckets (only with more than one bucket in use).
STREAM_BUCKETS = 3

# Placeholders of --prompt_template_file lines: ours first, then AUTOMATIC1111's spelling of the same.
TOKEN_PLACEHOLDERS = ("{token}", "[name]")
CAPTION_PLACEHOLDERS = ("{caption}", "[filewords]")
_PLACEHOLDER_PATTERN = re.compile("|".join(re.escape(p) for p in TOKEN_PLACEHOLDERS + CAPTION_PLACEHOLDERS))
# Stand-ins inside prompt patterns until tokenize() knows the placeholder string; NUL is removed from captions.
_TOKEN_SLOT, _CAPTION_SLOT = "\0token\0", "\0caption\0"
# A file name's leading number ("00012-", "003_") is numbering, not description: dropped as A1111 does.
_LEADING_NUMBER = re.compile(r"^\d+(?:[-_.\s]+|$)")
# Upscaled by more than this, a picture reaches --resolution as blur, which the vectors then learn.
SMALL_IMAGE_FACTOR = 2.0
# How many file names a one-line warning quotes before "and N more".
NAMES_SHOWN = 5
# Random crops start on multiples of this many pixels: one latent pixel of SD's VAE (factor 8), and few
# distinct crops per image, so the latent cache (one VAE encode per image, flip and crop) stays small.
CROP_STEP = 8
EXIF_ORIENTATION = 0x0112  # values 5-8 turn the picture by 90 degrees: width and height swap


# One drawn example: image index, mirrored or not, prompt row, and the (top, left) of its bucket crop (None
# without buckets).
Example = collections.namedtuple("Example", "image flipped prompt crop")


def templates_for(learnable_property):
    return STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES


def _is_first_process():
    """Every process of a multi-process run builds the dataset; only the first one reports on it."""
    return all(int(os.environ.get(name) or 0) == 0 for name in ("RANK", "JAX_PROCESS_ID"))


def _warn(message):
    if _is_first_process():
        warnings.warn(message, stacklevel=2)  # data.py: printed as one line


def _quote_names(names):
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def normalize_caption_extension(extension):
    """--caption_extension as a suffix with its dot (".txt"); "txt" is accepted too."""
    if extension is None:
        return None
    extension = extension.strip()
    if extension in ("", "."):
        raise UserError("--caption_extension is empty; give the caption files' extension, e.g. --caption_extension .txt")
    if not extension.startswith("."):
        extension = "." + extension
    if extension.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"--caption_extension {extension} is an image extension; captions are text files such as .txt")
    return extension


def caption_path_for(image_path, caption_extension):
    """photo1.jpg -> photo1.txt (kohya's sidecar naming): the image's name without its extension, plus caption_extension."""
    return os.path.splitext(image_path)[0] + caption_extension


def read_caption(path):
    """A caption file as one line of text: UTF-8 (a BOM is allowed), line breaks and runs of spaces become one space."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"caption file {path!r} is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read caption file {path!r} ({err.strerror}); check that it is a readable file") from None
    return " ".join(text.replace("\0", " ").split())


def caption_from_file_name(path):
    """The caption a file name gives: "00012-red_car at night.png" -> "red car at night"."""
    stem = _LEADING_NUMBER.sub("", os.path.splitext(os.path.basename(path))[0])
    return " ".join(stem.replace("\0", " ").replace("_", " ").split())


def read_prompt_templates(path):
    """The templates of a --prompt_template_file: one a line; blank lines and lines starting with # are skipped.

    Every template must hold the token placeholder: a prompt without the token trains nothing.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompt_template_file {path!r} does not exist; give a text file with one template a line") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompt_template_file {path!r} is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read --prompt_template_file {path!r} ({err.strerror}); give a readable text file") from None
    templates = []
    for number, line in enumerate(lines, 1):
        text = " ".join(line.split())
        if not text or text.startswith("#"):
            continue
        if not any(p in text for p in TOKEN_PLACEHOLDERS):
            hint = " (write {token} where diffusers' lists have {})" if "{}" in text else ""
            raise UserError(f"line {number} of --prompt_template_file {path!r} has no {{token}} (or [name]) placeholder"
                            f"{hint}: {text[:60]!r}; every prompt must contain the token being learned")
        templates.append(text)
    if not templates:
        raise UserError(f"--prompt_template_file {path!r} holds no template; write one a line, "
                        "e.g. a photo of {token}, {caption}")
    return templates


def _template_pattern(template):
    """A template line with its placeholders (either spelling) turned into the internal slots."""
    return _PLACEHOLDER_PATTERN.sub(lambda m: _TOKEN_SLOT if m.group(0) in TOKEN_PLACEHOLDERS else _CAPTION_SLOT,
                                    template)


def _token_pattern(placeholder_token):
    """Where a caption mentions the token: a whole word, and not the "<tok>_1" of a multi-vector expansion."""
    left = r"(?<!\w)" if re.match(r"\w", placeholder_token) else ""
    right = r"(?!\w)" if re.search(r"\w$", placeholder_token) else r"(?!_\d)"
    return re.compile(left + re.escape(placeholder_token) + right)


def _without_caption(pattern):
    """A template with an empty caption: the slot and the separators left around it go."""
    text = pattern.replace(_CAPTION_SLOT, "")
    text = re.sub(r",(?:\s*,)+", ",", text)
    text = re.sub(r"^[\s,]+|[\s,]+$", "", text)
    return " ".join(text.split())


def prompt_pattern(template_pattern, caption, token_pattern):
    """One image's prompt for one template, with the token still a slot.

    A caption that mentions the token is the prompt as it is (kohya's convention); otherwise it fills
    the caption slot; an empty caption leaves the template alone.
    """
    if caption and token_pattern.search(caption):
        return token_pattern.sub(lambda _: _TOKEN_SLOT, caption)
    if _CAPTION_SLOT not in template_pattern:
        return template_pattern
    return template_pattern.replace(_CAPTION_SLOT, caption) if caption else _without_caption(template_pattern)


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
    return _decode_image(path, resolution, center_crop)[0]


def _decode_image(path, resolution, center_crop):
    """load_image's array and the file's own (width, height), before any downscaled decoding."""
    with Image.open(path) as image:
        original_size = image.size
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
    return np.asarray(image, dtype=np.uint8).copy(), original_size


def _centre_square(size):
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _fit_weights(weights, center_crop, target):
    """A float32 [H, W] weight map given the picture's geometry (centre square if asked, then target
    (width, height)); resized by area averaging (BOX), so weights stay in [0, 1]."""
    image = Image.fromarray(np.ascontiguousarray(weights, dtype=np.float32))
    if center_crop:
        image = image.crop(_centre_square(image.size))
    return np.asarray(image.resize(target, resample=Image.Resampling.BOX), dtype=np.float32).copy()


def _decode_training_image(path, size, center_crop, buckets, want_alpha):
    """(pixels, alpha weights or None, original (width, height) after EXIF rotation, bucket index or None).

    Without buckets: load_image's pixels exactly ([size, size, 3]). With buckets: the picture resized
    (bicubic, aspect ratio kept) to cover its nearest bucket; the crop to the bucket is taken per example.
    """
    draft = size if buckets is None else max(max(b) for b in buckets)
    with Image.open(path) as image:
        file_size = image.size
        if image.format == "JPEG":
            image.draft("RGB", (draft * 2, draft * 2))
        image.load()
        turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
        image = ImageOps.exif_transpose(image)
        alpha = _alpha_of(image) if want_alpha else None
        image = _to_rgb(image)
    original = (file_size[1], file_size[0]) if turned else file_size
    bucket = None
    if buckets is None:
        target, square = (size, size), center_crop
        if center_crop:
            image = image.crop(_centre_square(image.size))
    else:
        bucket = nearest_bucket(original, buckets)
        target, square = cover_size(original, buckets[bucket]), False
    image = image.resize(target, resample=Image.Resampling.BICUBIC)
    if alpha is not None:
        alpha = _fit_weights(np.asarray(alpha, dtype=np.float32) / 255.0, square, target)
    return np.asarray(image, dtype=np.uint8).copy(), alpha, original, bucket


# --------------------------------------------------------------------------------------------------
# Aspect-ratio buckets, crops and masks


def bucket_resolutions(resolution, min_reso, max_reso, step):
    """The (width, height) buckets: both sides multiples of step within [min_reso, max_reso], each about
    resolution x resolution pixels (never more), with every shape also turned by 90 degrees.

    For each width w from min_reso up to resolution the height is the largest multiple of step with
    w * height <= resolution**2; a bucket whose longer side would pass max_reso is left out.
    """
    area = resolution * resolution
    found = set()
    for width in range(min_reso, resolution + 1, step):
        height = area // width // step * step
        if width <= height <= max_reso:
            found.update({(width, height), (height, width)})
    if not found:  # --resolution below a step: the one square bucket under it
        side = max(step, resolution // step * step)
        found.add((side, side))
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(size, buckets):
    """Index of the bucket whose aspect ratio is closest to size's (width, height): the smallest
    |log(bucket ratio / image ratio)|, so a 2:1 and a 1:2 picture are treated alike; a tie goes to the
    larger bucket, then the narrower one."""
    width, height = size
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio),
                                                    -buckets[i][0] * buckets[i][1], buckets[i][0]))


def cover_size(size, bucket):
    """(width, height) the picture is resized to before its crop: the smallest size, aspect ratio kept,
    that covers the bucket; one side equals the bucket's, the other is at least as long."""
    (width, height), (bucket_w, bucket_h) = size, bucket
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def crop_offsets(resized, bucket, random_crop):
    """The (top, left) corners a bucket-sized crop of the resized picture may take: the centred one, or
    with random_crop every multiple of CROP_STEP along the spare side and the far edge."""
    (width, height), (bucket_w, bucket_h) = resized, bucket
    if not random_crop:
        return [((height - bucket_h) // 2, (width - bucket_w) // 2)]

    def starts(spare):
        return sorted(set(range(0, spare + 1, CROP_STEP)) | {spare})

    return [(top, left) for top in starts(height - bucket_h) for left in starts(width - bucket_w)]


def area_average(mask, shape):
    """A [H, W] weight map averaged over equal blocks down to shape (h, w): the latent pixel's weight is
    the mean weight of the picture pixels it encodes. H and W must be multiples of h and w."""
    height, width = mask.shape
    rows, columns = shape
    if height % rows or width % columns:
        raise ValueError(f"a {width}x{height} mask does not divide into a {columns}x{rows} latent grid")
    return mask.reshape(rows, height // rows, columns, width // columns).mean(axis=(1, 3), dtype=np.float64) \
        .astype(np.float32)


def _alpha_of(image):
    """The picture's transparency as an 'L' image, or None when it has none."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return image.convert("RGBA").getchannel("A")
    return None


def read_mask(path, expected_size, image_name):
    """A mask image as float32 [height, width] weights in [0, 1] (read as grayscale: white trains, black is
    left out); it must have its picture's size (after EXIF rotation, as the picture is read)."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mask = ImageOps.exif_transpose(mask)
            if mask.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                mask = _to_rgb(mask)
            mask = mask.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read mask {path!r} ({reason}); re-save it as a grayscale PNG") from None
    if mask.size != tuple(expected_size):
        raise UserError(f"mask {path!r} is {mask.size[0]}x{mask.size[1]} but its image {image_name} is "
                        f"{expected_size[0]}x{expected_size[1]}; a mask must have its image's size")
    return np.asarray(mask, dtype=np.float32) / 255.0


def find_masks(mask_dir, image_paths, data_root):
    """The mask file of each image (None where there is none): the file in mask_dir at the image's path
    relative to --train_data_dir, with the same name; any image extension (photo1.jpg -> photo1.png)."""
    if not os.path.isdir(mask_dir):
        raise UserError(f"--mask_dir {mask_dir!r} is not a folder; give the folder that holds one mask per image")
    found = []
    for path in image_paths:
        relative = os.path.relpath(path, data_root)
        same = os.path.join(mask_dir, relative)
        if os.path.isfile(same):
            found.append(same)
            continue
        stem, folder = os.path.splitext(os.path.basename(relative))[0], os.path.join(mask_dir, os.path.dirname(relative))
        names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[0] == stem
                       and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS) if os.path.isdir(folder) else []
        found.append(os.path.join(folder, names[0]) if names else None)
    return found


def find_images(train_data_dir, recursive=False, caption_extension=None, exclude_dirs=()):
    """Sorted image files of a folder; with recursive, then those of its subfolders, folder by folder.

    Hidden files and folders, caption files, non-image files and exclude_dirs (the output folder, if it
    is inside) are passed over. What was left out is said once: non-image files, and without recursive
    the images in subfolders.
    """
    if not train_data_dir:
        raise UserError("--train_data_dir is required: a folder with 3-5 images of the concept")
    if not os.path.exists(train_data_dir):
        raise UserError(f"--train_data_dir {train_data_dir!r} does not exist; point it at a folder of images")
    if not os.path.isdir(train_data_dir):
        raise UserError(f"--train_data_dir {train_data_dir!r} is a file, not a folder; put the images in a folder and pass that")
    excluded = {os.path.realpath(d) for d in exclude_dirs if d}
    candidates, skipped = [], []
    in_subfolders = collections.Counter()  # top-level subfolder -> images left out (without recursive)
    for folder, subfolders, names in os.walk(train_data_dir):
        subfolders[:] = sorted(d for d in subfolders
                               if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) not in excluded)
        relative_folder = os.path.relpath(folder, train_data_dir)
        at_top = relative_folder == "."
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            is_image_name = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            if not at_top and not recursive:
                if is_image_name:
                    in_subfolders[relative_folder.split(os.sep)[0]] += 1
                continue
            if caption_extension and name.endswith(caption_extension):
                continue
            if is_image_name:
                candidates.append(path)
                continue
            try:  # no image extension: keep it only if PIL recognises the content
                with Image.open(path) as probe:
                    probe.size
                candidates.append(path)
            except (UnidentifiedImageError, OSError, ValueError):
                skipped.append(name if at_top else os.path.join(relative_folder, name))
    if skipped:
        image_stems = {os.path.splitext(os.path.relpath(p, train_data_dir))[0] for p in candidates}
        sidecars = collections.Counter(os.path.splitext(n)[1] for n in skipped if os.path.splitext(n)[0] in image_stems)
        hint = ""
        if sidecars and not caption_extension:
            hint = f" (caption files? pass --caption_extension {sidecars.most_common(1)[0][0]})"
        _warn(f"skipping {len(skipped)} non-image file(s) in {train_data_dir}: {', '.join(skipped[:5])}{hint}")
    left_out = sum(in_subfolders.values())
    if left_out and candidates:
        folders = _quote_names([f"{d}{os.sep} ({n})" for d, n in sorted(in_subfolders.items())])
        _warn(f"left out {left_out} image(s) in subfolders of {train_data_dir}: {folders}; "
              "pass --recursive to train on them too")
    if not candidates:
        where = f" (its {left_out} image(s) are in subfolders: pass --recursive)" if left_out else ""
        raise UserError(f"--train_data_dir {train_data_dir!r} contains no image files{where}; "
                        "add .jpg/.png images of the concept")
    return candidates


class TextualInversionDataset:
    """The training images (decoded once, both flips) and their tokenised prompts.

    ``example(global_index)`` says what the i-th drawn example is (image, flip, prompt row); ``pixels``
    gives an image in [-1, 1], CHW float32; ``prompt_ids`` the token ids of a prompt row. Indexing the
    dataset (``dataset[i]``) returns all of it as numpy arrays, like the diffusers dataset returns
    tensors.

    Prompt rows are the distinct prompts over (image, template). Without captions and template file
    every image has the same prompts, so the rows are the built-in templates and a row index is a
    template index, exactly as in diffusers' script.
    """

    def __init__(self, data_root, tokenizer=None, placeholder_string=None, learnable_property="object", size=512,
                 repeats=100, flip_p=0.5, center_crop=False, seed=0, num_workers=0, skip_bad_images=False,
                 placeholder_token=None, caption_extension=None, caption_from_filename=False,
                 prompt_template_file=None, recursive=False, exclude_dirs=(), enable_bucket=False, min_bucket_reso=256,
                 max_bucket_reso=1024, bucket_reso_steps=64, random_crop=False, alpha_mask=False, mask_dir=None,
                 image_paths=None):
        self.size = size
        self.flip_p = flip_p
        self.seed = int(seed)
        self.placeholder_string = placeholder_string
        self.data_root = data_root
        self.repeats = repeats
        self.center_crop, self.random_crop, self.enable_bucket = center_crop, random_crop, enable_bucket
        # Buckets: the (width, height) shapes pictures are fitted to. --random_crop alone is one square bucket
        # (the short side resized to --resolution, a random square of it). None: diffusers' square resize.
        self.buckets = None
        if enable_bucket:
            self.buckets = bucket_resolutions(size, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            if len(self.buckets) == 1:
                _warn(f"--enable_bucket: with --resolution {size}, --min_bucket_reso {min_bucket_reso} and "
                      f"--max_bucket_reso {max_bucket_reso} the only bucket is the square; widen the range (e.g. "
                      f"--max_bucket_reso {2 * size}) for other aspect ratios")
        elif random_crop:
            self.buckets = [(size, size)]
        self.bucket_settings = (min_bucket_reso, max_bucket_reso, bucket_reso_steps)
        caption_extension = normalize_caption_extension(caption_extension)
        # Read the template file first: its mistakes are reported before any image is decoded.
        templates = read_prompt_templates(prompt_template_file) if prompt_template_file else None
        if templates and not (caption_extension or caption_from_filename) and \
                any(_CAPTION_SLOT in _template_pattern(t) for t in templates):
            raise UserError(f"--prompt_template_file {prompt_template_file!r} uses {{caption}} (or [filewords]) but no "
                            "captions are read; pass --caption_extension .txt or --caption_from_filename, or remove "
                            "the placeholder")
        if mask_dir and os.path.isdir(mask_dir) and os.path.realpath(mask_dir) == os.path.realpath(data_root):
            raise UserError(f"--mask_dir {mask_dir!r} is --train_data_dir itself; put the masks in a folder of their own "
                            "(same file names as the images)")
        if image_paths is None:
            paths = find_images(data_root, recursive=recursive, caption_extension=caption_extension,
                                exclude_dirs=list(exclude_dirs) + ([mask_dir] if mask_dir else []))
        else:  # already listed (find_images) and split into training and held-out images (validation.py)
            paths = list(image_paths)
        decoded, self.image_paths = self._decode_all(paths, center_crop, num_workers, skip_bad_images, alpha_mask)
        self._images = [pixels for pixels, _, _, _ in decoded]
        self.original_sizes = [original for _, _, original, _ in decoded]  # (width, height), EXIF rotation applied
        self.num_images = len(self._images)
        self.num_examples = self.num_images * repeats
        self._order_cache, self._bucket_cache = {}, {}
        self._bucket_of, self._crops = None, None
        if self.buckets is not None:
            self._bucket_of = [bucket for _, _, _, bucket in decoded]
            self._crops = [crop_offsets((image.shape[1], image.shape[0]), self.buckets[bucket], random_crop)
                           for image, bucket in zip(self._images, self._bucket_of)]
        self._masks = None  # float32 weights per image, the stored pixels' geometry (None: all ones)
        if alpha_mask:
            self._masks = self._alpha_masks([alpha for _, alpha, _, _ in decoded])
        elif mask_dir:
            self._masks = self._read_masks(mask_dir)
        self._latent_masks = {}
        self.captions = self._read_captions(caption_extension, caption_from_filename)
        self._build_prompt_rows(templates, learnable_property, placeholder_token or
                                (placeholder_string.split()[0] if placeholder_string else None))
        self.prompts, self._prompt_ids = None, None
        if tokenizer is not None:
            self.tokenize(tokenizer, placeholder_string)

    def _name(self, path):
        return os.path.relpath(path, self.data_root)

    # ---- Masks

    @property
    def has_masks(self):
        """True when the loss is weighted per latent pixel (--alpha_mask or --masked_loss with --mask_dir)."""
        return self._masks is not None

    def _alpha_masks(self, alphas):
        opaque = [self._name(p) for p, a in zip(self.image_paths, alphas) if a is None]
        if len(opaque) == self.num_images:
            raise UserError(f"--alpha_mask: none of the {self.num_images} images has an alpha channel; save them as "
                            "PNG with a transparent background, or use --masked_loss with --mask_dir")
        if opaque:
            _warn(f"--alpha_mask: {len(opaque)} of {self.num_images} images have no alpha channel and are trained "
                  f"unmasked: {_quote_names(opaque)}")
        self._warn_empty_masks(alphas, "alpha channel is fully transparent")
        return alphas

    def _read_masks(self, mask_dir):
        paths = find_masks(mask_dir, self.image_paths, self.data_root)
        missing = [self._name(p) for p, m in zip(self.image_paths, paths) if m is None]
        if len(missing) == self.num_images:
            example = os.path.splitext(os.path.basename(self.image_paths[0]))[0]
            raise UserError(f"--mask_dir {mask_dir!r}: none of the {self.num_images} images has a mask there (looked for "
                            f"{example}.png and the like); a mask has its image's file name")
        if missing:
            _warn(f"--mask_dir: {len(missing)} of {self.num_images} images have no mask and are trained unmasked: "
                  f"{_quote_names(missing)}")
        masks = []
        for image_index, (path, mask_path) in enumerate(zip(self.image_paths, paths)):
            if mask_path is None:
                masks.append(None)
                continue
            weights = read_mask(mask_path, self.original_sizes[image_index], self._name(path))
            image = self._images[image_index]
            masks.append(_fit_weights(weights, self.center_crop and self.buckets is None,
                                      (image.shape[1], image.shape[0])))
        self._warn_empty_masks(masks, "mask is black")
        return masks

    def _warn_empty_masks(self, masks, what):
        empty = [self._name(p) for p, m in zip(self.image_paths, masks) if m is not None and not m.any()]
        if empty:
            _warn(f"{len(empty)} image(s) train nothing: the {what} everywhere: {_quote_names(empty)}")

    def pixel_mask(self, image_index, flipped, crop=None):
        """The loss weights [H, W] float32 of an example's picture (crop and flip as pixels()); all ones for an
        image without a mask."""
        mask = self._masks[image_index]
        if mask is None:
            image = self._images[image_index]
            height, width = (image.shape[0], image.shape[1]) if crop is None else self._bucket_shape(image_index)
            return np.ones((height, width), np.float32)
        if crop is not None:
            (top, left), (height, width) = crop, self._bucket_shape(image_index)
            mask = mask[top:top + height, left:left + width]
        return np.ascontiguousarray(mask[:, ::-1] if flipped else mask)

    def latent_mask(self, key, latent_size):
        """An example's weights at latent resolution, [1, h, w] float32: pixel_mask area-averaged over the
        pixels each latent pixel encodes. key is the example's latent-cache key; latent_size is (h, w)."""
        cache_key = (key, tuple(latent_size))
        mask = self._latent_masks.get(cache_key)
        if mask is None:
            mask = area_average(self.pixel_mask(*key), latent_size)[None]
            self._latent_masks[cache_key] = mask
        return mask

    # ---- Buckets

    def _bucket_shape(self, image_index):
        """(height, width) of the image's bucket."""
        width, height = self.buckets[self._bucket_of[image_index]]
        return height, width

    def bucket_counts(self):
        """{(width, height): number of images} of the buckets that hold images, in bucket order."""
        counts = collections.Counter(self._bucket_of)
        return {self.buckets[b]: counts[b] for b in sorted(counts)}

    def bucket_summary(self):
        """Lines saying which buckets hold how many images (printed once at start)."""
        counts = self.bucket_counts()
        if self.enable_bucket:
            low, high, step = self.bucket_settings
            head = (f"aspect-ratio buckets: {len(self.buckets)} of about {self.size}x{self.size} pixels (sides "
                    f"{low}-{high}, multiples of {step}); {len(counts)} hold the {self.num_images} images:")
        else:
            head = f"--random_crop: every image in one {self.size}x{self.size} bucket:"
        lines = [head]
        for (width, height), count in counts.items():
            shape = "square" if width == height else "landscape" if width > height else "portrait"
            lines.append(f"  {width}x{height} ({shape}, {width / height:.2f}): {count} image{'s' if count > 1 else ''}")
        crop = "random" if self.random_crop else "centred"
        lines.append(f"  each image is resized to cover its bucket, then cropped to it ({crop} crop)")
        return lines

    @property
    def num_latent_keys(self):
        """How many distinct latent-cache entries the examples can need: image x flip (x crop)."""
        per_image = [2] * self.num_images if self._crops is None else [2 * len(c) for c in self._crops]
        return sum(per_image)

    def latent_key(self, example):
        """The latent-cache key of an Example: (image, flip), with buckets (image, flip, crop)."""
        if example.crop is None:
            return example.image, example.flipped
        return example.image, example.flipped, example.crop

    def time_ids(self, example):
        """SDXL's micro-conditioning of an example, int64 [original height, original width, crop top, crop
        left, target height, target width]: the picture's true size (EXIF rotation applied), and where its
        crop starts in the picture resized so that the crop fits (short side to --resolution without
        buckets), in the mirrored picture for a flipped example."""
        width, height = self.original_sizes[example.image]
        if example.crop is not None:
            target_h, target_w = self._bucket_shape(example.image)
            resized = self._images[example.image]
            (top, left), resized_w = example.crop, resized.shape[1]
        elif self.center_crop:
            target_h = target_w = self.size
            scale = self.size / min(width, height)
            left_px, top_px, _, _ = _centre_square((width, height))
            top, left, resized_w = round(top_px * scale), round(left_px * scale), round(width * scale)
        else:  # the whole picture resized to the square: nothing cut off
            return np.array([height, width, 0, 0, self.size, self.size], np.int64)
        if example.flipped:
            left = max(0, resized_w - target_w - left)
        return np.array([height, width, top, left, target_h, target_w], np.int64)

    def _read_captions(self, caption_extension, caption_from_filename):
        """One caption per kept image ("" when it has none), or None when captions are off.

        A caption file wins over the file name, even when empty; an image without a caption is trained
        with the template alone (warned), and no caption file at all for --caption_extension is an error.
        """
        if not caption_extension and not caption_from_filename:
            return None
        captions, missing, empty_files, empty_names = [], [], [], []
        for path in self.image_paths:
            sidecar = caption_path_for(path, caption_extension) if caption_extension else None
            if sidecar and os.path.isfile(sidecar):
                caption = read_caption(sidecar)
                if not caption:
                    empty_files.append(self._name(sidecar))
            elif caption_from_filename:
                caption = caption_from_file_name(path)
                if not caption:
                    empty_names.append(self._name(path))
            else:
                caption = ""
                missing.append(self._name(path))
            captions.append(caption)
        if missing and len(missing) == self.num_images:
            example = os.path.basename(caption_path_for(self.image_paths[0], caption_extension))
            raise UserError(f"--caption_extension {caption_extension}: none of the {self.num_images} images has a caption "
                            f"file (looked for {example} next to {os.path.basename(self.image_paths[0])}); check the "
                            "extension, or pass --caption_from_filename")
        if missing:
            _warn(f"{len(missing)} of {self.num_images} images have no {caption_extension} caption file and are trained "
                  f"with the prompt template alone: {_quote_names(missing)} (add the files, or pass "
                  "--caption_from_filename to caption them by file name)")
        if empty_files:
            _warn(f"{len(empty_files)} caption file(s) are empty, so their images are trained with the prompt template "
                  f"alone: {_quote_names(empty_files)}")
        if empty_names:
            _warn(f"{len(empty_names)} file name(s) give no caption (only a number), so their images are trained with "
                  f"the prompt template alone: {_quote_names(empty_names)}")
        return captions

    def _build_prompt_rows(self, templates, learnable_property, placeholder_token):
        """The distinct prompts (token as a slot) and, per image and template, the row that holds its prompt."""
        if templates is None:
            self.templates = templates_for(learnable_property)
            patterns = [t.replace("{}", _TOKEN_SLOT) for t in self.templates]
            if self.captions is not None:  # built-in template, then the caption: "a photo of a <tok>, <caption>"
                patterns = [p + ", " + _CAPTION_SLOT for p in patterns]
        else:
            self.templates = templates
            patterns = [_template_pattern(t) for t in templates]
        if self.captions is None:  # (a {caption} placeholder without captions was refused in __init__)
            self._patterns = patterns
            self._row_of = np.tile(np.arange(len(patterns)), (self.num_images, 1))
            return
        if placeholder_token is None:
            raise ValueError("captions need placeholder_token, to find the captions that already contain it")
        token = _token_pattern(placeholder_token)
        if not any(_CAPTION_SLOT in p for p in patterns):
            unused = [self._name(p) for p, c in zip(self.image_paths, self.captions) if c and not token.search(c)]
            if unused:
                _warn(f"--prompt_template_file has no {{caption}} (or [filewords]) placeholder, so the captions of "
                      f"{len(unused)} image(s) without {placeholder_token} in them are not used: {_quote_names(unused)}")
        rows, self._patterns = {}, []
        self._row_of = np.zeros((self.num_images, len(patterns)), dtype=np.int64)
        for image_index, caption in enumerate(self.captions):
            for template_index, template_pattern in enumerate(patterns):
                prompt = prompt_pattern(template_pattern, caption, token)
                if prompt not in rows:
                    rows[prompt] = len(self._patterns)
                    self._patterns.append(prompt)
                self._row_of[image_index, template_index] = rows[prompt]

    def tokenize(self, tokenizer, placeholder_string, max_length=None, trained=True):
        """Fill every prompt with the placeholder string and tokenise each distinct prompt once, padded to
        max_length tokens (default the tokenizer's limit; T5 takes --max_sequence_length).

        Prompts longer than that are cut, with one warning; a prompt whose cut leaves none of the
        placeholder's tokens would train nothing and is an error for the tokenizer of a trained encoder
        (trained=False: a frozen encoder's, which reads the placeholder as plain text).
        """
        self.placeholder_string = placeholder_string
        self.prompts = [p.replace(_TOKEN_SLOT, placeholder_string) for p in self._patterns]
        max_length = max_length or tokenizer.model_max_length
        self._prompt_ids = np.asarray(
            tokenizer(self.prompts, padding="max_length", truncation=True, max_length=max_length).input_ids,
            dtype=np.int64)
        # Only a row with no padding before its last place can have been cut; only those are measured
        # again, so short prompts (every built-in template) are tokenised once.
        pad = tokenizer.pad_token_id
        near_limit = [row for row, ids in enumerate(self._prompt_ids) if pad is None or ids[-2] != pad]
        if not near_limit:
            return
        measured = tokenizer([self.prompts[row] for row in near_limit], verbose=False).input_ids
        lengths = {row: len(ids) for row, ids in zip(near_limit, measured)}
        cut = [row for row in near_limit if lengths[row] > max_length]
        if not cut:
            return
        placeholder_ids = tokenizer.convert_tokens_to_ids(placeholder_string.split())
        lost = [row for row in cut if not np.isin(self._prompt_ids[row], placeholder_ids).any()] if trained else []
        if lost:
            raise UserError(f"the prompt of {self._images_of(lost)} is longer than {max_length} tokens and, cut there, "
                            f"keeps none of {placeholder_string.split()[0]}; shorten the caption or put the token nearer "
                            "its start")
        _warn(f"{len(cut)} prompt(s) are longer than the tokenizer's {max_length} tokens (longest {max(lengths.values())}) "
              f"and are cut to {max_length}; the text past the cut is not seen. Prompts of {self._images_of(cut)}")

    def _images_of(self, rows):
        """The images whose prompts are these rows, quoted for a message."""
        used = np.isin(self._row_of, rows).any(axis=1)
        return _quote_names([self._name(p) for p, u in zip(self.image_paths, used) if u])

    @property
    def all_prompt_ids(self):
        """[num_prompt_rows, max_length] int64 token ids of every prompt."""
        return self._prompt_ids

    def _decode_all(self, paths, center_crop, num_workers, skip_bad_images, want_alpha):
        """Decode every image: (list of _decode_training_image results, the paths kept)."""
        size, buckets = self.size, self.buckets

        def decode(path):
            try:
                return _decode_training_image(path, size, center_crop, buckets, want_alpha), None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                return None, err

        if num_workers > 0:
            with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
                results = list(pool.map(decode, paths))
        else:
            results = [decode(p) for p in paths]
        decoded, kept, small = [], [], []
        for path, (result, err) in zip(paths, results):
            if result is None:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                if not skip_bad_images:
                    raise UserError(f"cannot read image {path!r} ({reason}); remove or re-save it, or pass --skip_bad_images")
                _warn(f"skipping unreadable image {path}: {reason}")
                continue
            decoded.append(result)
            kept.append(path)
            width, height = original_size = result[2]
            if result[3] is None:  # the short side's upscale, with or without --center_crop
                factor = size / min(original_size)
            else:  # the upscale to cover the bucket
                factor = max(buckets[result[3]][0] / width, buckets[result[3]][1] / height)
            if factor > SMALL_IMAGE_FACTOR:
                small.append(f"{os.path.relpath(path, self.data_root)} ({width}x{height}, {factor:.3g}x)")
        if not decoded:
            raise UserError(f"none of the {len(paths)} image files in the data folder could be read; check the files")
        if small:
            _warn(f"{len(small)} image(s) are much smaller than --resolution {size} and are upscaled to it, which "
                  f"blurs them: {_quote_names(small)}; use larger images or a lower --resolution")
        return decoded, kept

    def __len__(self):
        return self.num_examples

    def _epoch_order(self, epoch):
        order = self._order_cache.get(epoch)
        if order is None:
            rng = np.random.default_rng(example_seed(self.seed, epoch, STREAM_ORDER))
            order = rng.permutation(self.num_examples) % self.num_images
            self._order_cache = {epoch: order}  # one epoch at a time is all a run needs
        return order

    def _bucket_groups(self):
        """The image indices of each bucket in use, in bucket order (None without buckets)."""
        if self._bucket_of is None:
            return None
        return [[i for i, b in enumerate(self._bucket_of) if b == bucket] for bucket in sorted(set(self._bucket_of))]

    def _bucket_round(self, epoch, global_batch):
        """One round of the bucketed order: (bucket of each global batch, how many batches of that bucket come
        before it, each bucket's example stream). Bucket k holding n images gets ceil(n x repeats / global
        batch) whole global batches per round, in a keyed random order; its examples are a keyed permutation
        of its n x repeats examples, the first ones repeated to fill its last batch."""
        key = (epoch, global_batch)
        cached = self._bucket_cache.get(key)
        if cached is None:
            groups = self._bucket_groups()
            counts = [math.ceil(len(g) * self.repeats / global_batch) for g in groups]
            entropy = example_seed(self.seed, epoch, STREAM_BUCKETS)
            slots = np.random.default_rng([entropy, global_batch]).permutation(np.repeat(np.arange(len(groups)), counts))
            before, seen = np.zeros(len(slots), np.int64), [0] * len(groups)
            for n, bucket in enumerate(slots):
                before[n], seen[bucket] = seen[bucket], seen[bucket] + 1
            streams = [np.asarray(g)[np.random.default_rng([entropy, global_batch, k]).permutation(len(g) * self.repeats)
                                     % len(g)] for k, g in enumerate(groups)]
            cached = (slots, before, streams)
            self._bucket_cache = {key: cached}  # one round at a time is all a run needs
        return cached

    def _image_of(self, global_index, global_batch):
        groups = self._bucket_groups() if self._bucket_of is not None else None
        if groups is None or len(groups) == 1:  # diffusers' order (one bucket holds every image: the same)
            epoch, position = divmod(global_index, self.num_examples)
            return int(self._epoch_order(epoch)[position])
        # Global batch by global batch, each from one bucket: N devices sharing a batch draw from one bucket.
        batch, within = divmod(global_index, global_batch)
        per_round = sum(math.ceil(len(g) * self.repeats / global_batch) for g in groups)
        epoch, slot = divmod(batch, per_round)
        slots, before, streams = self._bucket_round(epoch, global_batch)
        stream = streams[slots[slot]]
        return int(stream[(before[slot] * global_batch + within) % len(stream)])

    def draw(self, global_index, global_batch=1):
        """The Example (image, flipped, prompt row, crop) drawn as the global_index-th example of training.

        global_batch (examples per optimizer step) matters only with several buckets in use: every global
        batch is drawn from one bucket. crop is the (top, left) of the bucket-sized crop, None without buckets.
        """
        global_index = int(global_index)
        image_index = self._image_of(global_index, global_batch)
        rng = np.random.default_rng(example_seed(self.seed, global_index, STREAM_AUGMENT))
        flipped = bool(rng.random() < self.flip_p)
        template_index = int(rng.integers(len(self.templates)))
        crop = None
        if self._crops is not None:  # drawn after diffusers' draws, which stay as they are
            crops = self._crops[image_index]
            crop = crops[int(rng.integers(len(crops)))] if len(crops) > 1 else crops[0]
        return Example(image_index, flipped, int(self._row_of[image_index, template_index]), crop)

    def example(self, global_index, global_batch=1):
        """(image_index, flipped, prompt_index) of the global_index-th example drawn in training.

        The template is drawn as in diffusers' order of draws; prompt_index is the row of
        all_prompt_ids holding that template filled for that image.
        """
        return tuple(self.draw(global_index, global_batch)[:3])

    def pixels(self, image_index, flipped, crop=None):
        """An example's picture in [-1, 1], CHW float32 (crop: its (top, left) in the bucketed picture)."""
        image = self._images[image_index]
        if crop is not None:
            (top, left), (height, width) = crop, self._bucket_shape(image_index)
            image = image[top:top + height, left:left + width]
        if flipped:
            image = image[:, ::-1]
        array = image.astype(np.float32) / 127.5 - 1.0
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def prompt_ids(self, prompt_index):
        if self._prompt_ids is None:
            raise ValueError("dataset was built without a tokenizer")
        return self._prompt_ids[prompt_index]

    def __getitem__(self, global_index):
        example = self.draw(global_index)
        image_index, flipped, prompt_index, crop = example
        item = {"pixel_values": self.pixels(image_index, flipped, crop), "image_index": image_index,
                "flipped": flipped, "prompt_index": prompt_index, "time_ids": self.time_ids(example)}
        if crop is not None:
            item["crop"] = crop
        if self.has_masks:
            item["mask"] = self.pixel_mask(image_index, flipped, crop)
        if self.prompts is not None:
            item["text"] = self.prompts[prompt_index]
        if self._prompt_ids is not None:
            item["input_ids"] = self.prompt_ids(prompt_index)
        return item


def placeholder_tokens_for(placeholder_token, num_vectors):
    """The tokens added to the tokenizer: <tok>, <tok>_1, ..., <tok>_{n-1} (diffusers' naming)."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
