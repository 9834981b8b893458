"""The validation loss: the denoising loss of the token's prompts on held-out images, with fixed draws.

Framework-free. The held-out images are a fraction of --train_data_dir (--validation_split, which ones fixed
by --validation_seed) or a folder of their own (--validation_data_dir). Each held-out image is drawn
DRAWS_PER_IMAGE times, once at each of DRAWS_PER_IMAGE timesteps spread evenly over the training range; flip,
template and crop come from the held-out set's keyed draws, the posterior sample and noise from the example's
keyed seed, drawn by the trainer's framework as in training. The draws are fixed when the run starts: the same
numbers at every measurement (a curve shows the vectors changing, not the draws), after a resume and on any
number of processes (only the main process measures, in chunks of --train_batch_size, whatever the process
count). The same draws with the initializer's text in place of the token are the baseline: the loss the
initializer's words already reach, which the learned vectors have to beat.

The loss is the plain one (masked where training is masked): no min-SNR weights and no noise offset, so
settings of those flags can be compared by it.
"""

import os

import numpy as np

from . import data
from .errors import UserError

DRAWS_PER_IMAGE = 10  # one per timestep, spread over the training range
SPLIT_STREAM = 5  # keyed stream of the held-out split (data.py's streams are 0-3)


def validation_seed(args):
    """--validation_seed, else --seed, else 0: a flag, not the drawn seed, so a resumed run splits alike."""
    if args.validation_seed is not None:
        return int(args.validation_seed)
    return int(args.seed) if args.seed is not None else 0


def split_images(paths, fraction, seed):
    """(training paths, held-out paths) of a sorted image list: round(fraction x count) images, at least one,
    chosen by a keyed permutation. Every image held out is a one-line error."""
    count = len(paths)
    held = max(1, int(round(fraction * count)))
    if held >= count:
        raise UserError(f"--validation_split {fraction} of {count} image(s) leaves no training image; lower it, add "
                        "images, or give held-out images in --validation_data_dir")
    order = np.random.default_rng(data.example_seed(seed, 0, SPLIT_STREAM)).permutation(count)
    chosen = set(int(i) for i in order[:held])
    return ([p for i, p in enumerate(paths) if i not in chosen], [p for i, p in enumerate(paths) if i in chosen])


def dataset_options(args):
    """The TextualInversionDataset options both the training and the held-out images are read with."""
    return dict(learnable_property=args.learnable_property, size=args.resolution, center_crop=args.center_crop,
                num_workers=args.dataloader_num_workers, skip_bad_images=args.skip_bad_images,
                placeholder_token=args.placeholder_token, caption_extension=args.caption_extension,
                caption_from_filename=args.caption_from_filename, prompt_template_file=args.prompt_template_file,
                recursive=args.recursive, enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
                max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
                random_crop=args.random_crop, alpha_mask=args.alpha_mask)


def held_out(args):
    """(training image paths or None for all, held-out TextualInversionDataset or None), before any model loads."""
    if args.validation_split is None and not args.validation_data_dir:
        return None, None
    options = dataset_options(args)
    seed = validation_seed(args)
    if args.validation_data_dir:
        held = data.TextualInversionDataset(args.validation_data_dir, repeats=1, seed=seed, exclude_dirs=[args.output_dir],
                                            **options)
        return None, held
    paths = data.find_images(args.train_data_dir, recursive=args.recursive,
                             caption_extension=data.normalize_caption_extension(args.caption_extension),
                             exclude_dirs=[args.output_dir] + ([args.mask_dir] if args.mask_dir else []))
    train_paths, held_paths = split_images(paths, args.validation_split, seed)
    held = data.TextualInversionDataset(args.train_data_dir, repeats=1, seed=seed, image_paths=held_paths,
                                        mask_dir=args.mask_dir if args.masked_loss else None, **options)
    return train_paths, held


def spread_timesteps(low, high, count=DRAWS_PER_IMAGE):
    """count timesteps in [low, high), the middles of count equal bins."""
    return [low + int((k + 0.5) * (high - low) / count) for k in range(count)]


class ValidationLoss:
    """The fixed held-out draws, their latents, and the loss of the token's and the initializer's prompts on them.

    dataset: the held-out TextualInversionDataset; tokenizers: the run's tokenizers (with the placeholder tokens);
    placeholder_strings: the placeholder string of each tokenizer; encode: the trainer's posterior encoder (as for
    run.LatentCache), called here once for every held-out picture; timestep_range: (low, high) of training;
    chunk: examples per loss call.
    """

    def __init__(self, dataset, tokenizers, placeholder_strings, initializer_text, encode, timestep_range, chunk):
        from .run import LatentCache

        self.dataset, self.num_images = dataset, dataset.num_images
        self.images = [os.path.basename(p) for p in dataset.image_paths]
        timesteps = spread_timesteps(*timestep_range)
        draws = []  # (global index, Example, timestep); round k of the keyed order meets every image once
        for index in range(self.num_images * len(timesteps)):
            draws.append((index, dataset.draw(index), timesteps[index // self.num_images]))
        self.num_draws = len(draws)
        # The prompt rows of the token's text, then the same rows with the initializer's text (the baseline).
        self.prompt_ids = []
        for tokenizer, placeholder in zip(tokenizers, placeholder_strings):
            dataset.tokenize(tokenizer, initializer_text)
            baseline = dataset.all_prompt_ids.copy()
            dataset.tokenize(tokenizer, placeholder)
            self.prompt_ids.append(np.concatenate([dataset.all_prompt_ids, baseline]))
        self.baseline_offset = len(baseline)
        latents = LatentCache(dataset, encode)
        keys = [dataset.latent_key(example) for _, example, _ in draws]
        latents(keys)  # every held-out picture encoded now, before the trainer frees its VAE encoder
        self.batches = []
        by_shape = {}
        for (index, example, timestep), key in zip(draws, keys):
            shape = latents.entries[key][0].shape
            by_shape.setdefault(shape, []).append((index, example, timestep, key))
        for group in by_shape.values():
            for start in range(0, len(group), chunk):
                self.batches.append(self._host_batch(group[start:start + chunk], latents))
        self.baseline = None

    def _host_batch(self, items, latents):
        """A batch in run.host_batch's layout ([1 micro-batch, n, ...]) plus the fixed "timestep" of each draw."""
        keys = [key for _, _, _, key in items]
        mean, std = latents(keys)
        batch = {"mean": mean, "std": std,
                 "noise_seed": np.array([data.example_seed(self.dataset.seed, i, data.STREAM_NOISE)
                                         for i, _, _, _ in items], np.uint64),
                 "prompt": np.array([e.prompt for _, e, _, _ in items], np.int64),
                 "time_ids": np.stack([self.dataset.time_ids(e) for _, e, _, _ in items]),
                 "timestep": np.array([t for _, _, t, _ in items], np.int64)}
        if self.dataset.has_masks:
            batch["mask"] = np.stack([self.dataset.latent_mask(k, mean.shape[-2:]) for k in keys])
        return {name: value[None] for name, value in batch.items()}

    def _mean(self, loss_of, baseline):
        total = 0.0
        for batch in self.batches:
            if baseline:
                batch = dict(batch, prompt=batch["prompt"] + self.baseline_offset)
            total += float(loss_of(batch, self.prompt_ids)) * batch["prompt"].shape[1]
        return total / self.num_draws

    def measure(self, loss_of):
        """{"validation_loss": ..., "validation_baseline": ...} with loss_of(batch, prompt_ids) -> the mean loss of
        one batch (the trainer's loss with the current vectors). The baseline does not depend on the vectors: it is
        computed once."""
        if self.baseline is None:
            self.baseline = self._mean(loss_of, baseline=True)
        return {"validation_loss": self._mean(loss_of, baseline=False), "validation_baseline": self.baseline}

    def describe(self):
        return {"images": self.images, "draws": self.num_draws, "seed": self.dataset.seed}

