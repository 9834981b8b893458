"""The run logic both trainers share, written once so the two loops cannot drift.

Framework-free: the step arithmetic (a frozen RunPlan), which examples a (step, micro-batch, device)
trains on, what is saved or sampled after a step, the seed, the resume checks, the checkpoint
payload, stop signals and the finite checks. A trainer adds only its models, its train step and the
moves of values between device and host.
"""

import dataclasses
import math
import random
import signal

import numpy as np

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class StepActions:
    """What the loop does after an optimizer step, in this order."""

    fetch_losses: bool  # bring the pending losses to the host and check them (before anything is saved)
    save_embeddings: bool  # learned_embeds-steps-N.*
    save_checkpoint: bool  # checkpoint-N/
    validate: bool  # sample validation images
    stop: bool  # interrupted by a signal: leave the loop (after the saves above)
    validation_loss: bool = False  # measure the loss on the held-out images (validation.py), after the saves
    paper_scores: bool = False  # score the step's vectors with CLIP (evaluate.py)

    @property
    def evaluate(self):
        return self.validation_loss or self.paper_scores


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The step arithmetic of one run. "device" is a PyTorch process or a JAX device."""

    per_device_batch: int
    num_devices: int
    accumulation: int
    num_examples: int  # examples in one epoch: images x repeats
    max_train_steps: int
    learning_rate: float  # after --scale_lr
    save_steps: int = 0
    checkpointing_steps: int = 0
    validation_steps: int = 0  # 0: no validation
    logging_steps: int = 1
    validation_loss: bool = False  # held-out images given: measure at save steps, the last step and every
    validate_every_n_steps: int = 0  # these steps
    paper_scores: bool = False  # --eval_clip_model: score at save steps and the last step

    @property
    def micro_batch(self):
        """Examples in one micro-batch over all devices."""
        return self.per_device_batch * self.num_devices

    @property
    def global_batch(self):
        """Examples per optimizer step (what a checkpoint records: resume needs the same)."""
        return self.micro_batch * self.accumulation

    @property
    def steps_per_epoch(self):
        return math.ceil(self.num_examples / self.global_batch)

    def example_indices(self, step, micro, first_device, num_local_devices=1):
        """Global example indices of the devices first_device .. first_device+num_local_devices-1 in one
        micro-batch. The union over all devices is the micro-batch, whatever the device count, so N
        devices equal one device with the same global batch, and a resumed run the uninterrupted one."""
        first = (step * self.accumulation + micro) * self.micro_batch + first_device * self.per_device_batch
        return range(first, first + num_local_devices * self.per_device_batch)

    def actions(self, step, interrupted=False):
        """What to do after optimizer step `step` (1-based: the number of steps done)."""
        last = step >= self.max_train_steps
        stop = interrupted and not last  # an interrupted last step ends normally, with the final files

        def every(n):
            return bool(n) and step % n == 0

        save_embeddings = every(self.save_steps) or stop
        save_checkpoint = every(self.checkpointing_steps) or stop
        validate = every(self.validation_steps)
        validation_loss = self.validation_loss and (every(self.validate_every_n_steps) or save_embeddings or last)
        paper_scores = self.paper_scores and (every(self.save_steps) or last)
        fetch = every(self.logging_steps) or last or save_embeddings or save_checkpoint or validate or stop \
            or validation_loss or paper_scores
        return StepActions(fetch, save_embeddings, save_checkpoint, validate, stop, validation_loss, paper_scores)


def make_plan(args, num_examples, num_devices):
    """The RunPlan of the parsed flags (diffusers' rules: --max_train_steps wins over epochs,
    --validation_epochs is converted to steps, --scale_lr multiplies by the global batch)."""
    accumulation = args.gradient_accumulation_steps
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate = learning_rate * accumulation * args.train_batch_size * num_devices
    steps_per_epoch = math.ceil(num_examples / (args.train_batch_size * num_devices * accumulation))
    validation_steps = args.validation_steps or 0
    if args.validation_epochs is not None:
        validation_steps = args.validation_epochs * steps_per_epoch
    return RunPlan(
        per_device_batch=args.train_batch_size, num_devices=num_devices, accumulation=accumulation,
        num_examples=num_examples, max_train_steps=args.max_train_steps or args.num_train_epochs * steps_per_epoch,
        learning_rate=learning_rate, save_steps=args.save_steps or 0, checkpointing_steps=args.checkpointing_steps or 0,
        validation_steps=validation_steps if args.validation_prompt else 0, logging_steps=args.logging_steps,
        validation_loss=args.validation_split is not None or bool(args.validation_data_dir),
        validate_every_n_steps=args.validate_every_n_steps or 0, paper_scores=bool(args.eval_clip_model))


def resolve_seed(flag_seed, resume_state, logger, share=None):
    """The run's seed: the checkpoint's when resuming, else --seed, else drawn once. share(seed) gives
    every process the first process's value (a random draw differs per process)."""
    seed = flag_seed if flag_seed is not None else random.SystemRandom().randrange(2**31)
    if resume_state is not None:
        if flag_seed is not None and flag_seed != resume_state["seed"]:
            logger.warning("--seed %s differs from the checkpoint's %s; using the checkpoint's", flag_seed,
                           resume_state["seed"])
        seed = resume_state["seed"]
    return int(share(seed) if share is not None else seed)


# --------------------------------------------------------------------------------------------------
# Checkpoints: what they hold and when one fits this run


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """AdamW's state of the vectors under the PyTorch names (both trainers read and write these)."""

    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    step: int


# The optimizer a checkpoint's state belongs to (training_state.json "optimizer"; absent: AdamW, as before).
ADAMW, ADAMW_8BIT = "adamw", "adamw8bit"
OPTIMIZER_NAMES = {ADAMW: "AdamW", ADAMW_8BIT: "bitsandbytes' AdamW8bit (--use_8bit_adam)"}
# bitsandbytes AdamW8bit's state tensors of one parameter, under its own names.
ADAM_8BIT_TENSORS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec")


@dataclasses.dataclass(frozen=True)
class Adam8bitState:
    """bitsandbytes AdamW8bit's own state of one vector set, kept as the optimizer holds it so that a resumed run
    continues bit for bit (dequantised moments re-quantised on load would not: the codes and block scales are
    the state). state1/state2 are the first and second moments: float32 for a set under 4096 values, else uint8
    codes into the 256-value maps qmap1/qmap2, scaled per block of 256 values by absmax1/absmax2 (float32)."""

    tensors: dict  # name in ADAM_8BIT_TENSORS -> numpy array
    step: int


def optimizer_of(state):
    """The optimizer whose state a checkpoint holds (checkpoints written before 8-bit support hold AdamW's)."""
    return state.get("optimizer", ADAMW)


def check_optimizer(resume_path, resume_state, optimizer):
    """A checkpoint resumes only with the optimizer that wrote its state: AdamW's moments are not AdamW8bit's
    quantised state (nor the reverse), and a converted state would not continue the run exactly."""
    stored = optimizer_of(resume_state)
    if stored == optimizer:
        return
    if stored == ADAMW_8BIT:
        fix = "resume with textual_inversion.py --use_8bit_adam"
    elif optimizer == ADAMW_8BIT:
        fix = "resume without --use_8bit_adam"
    else:
        fix = "resume with the optimizer it was trained with"
    raise UserError(f"checkpoint {resume_path!r} holds {OPTIMIZER_NAMES.get(stored, stored)} state "
                    f"({resume_state.get('framework', 'pytorch')} trainer) but this run uses "
                    f"{OPTIMIZER_NAMES.get(optimizer, optimizer)}; {fix} or start a new --output_dir")


def set_suffix(index):
    """Tensor-name suffix of the vector set of text encoder `index`: "" (text_encoder), "_2" (text_encoder_2)."""
    return "" if index == 0 else f"_{index + 1}"


def checkpoint_payload(vector_sets, adam_sets, seed, args, plan, framework, optimizer=ADAMW, family_state=None):
    """(tensors, state) of a checkpoint: one vector set per text encoder (SD-1.x/2.x: one, SDXL: two), their
    optimizer state (None before the first update) and what resuming must match. Set i is stored as vectors{s}
    and, for AdamW (AdamMoments), exp_avg{s}, exp_avg_sq{s} with s = set_suffix(i), so SD-1.x checkpoints keep
    their names; AdamW8bit's state (Adam8bitState) as bnb_<its name>{s} (bnb_state1, bnb_absmax1, ...)."""
    tensors = {}
    for i, vectors in enumerate(vector_sets):
        tensors["vectors" + set_suffix(i)] = np.asarray(vectors, np.float32)
    step = adam_sets[0].step if adam_sets else 0
    if step:
        for i, adam in enumerate(adam_sets):
            if isinstance(adam, Adam8bitState):
                for name, value in adam.tensors.items():
                    tensors[f"bnb_{name}{set_suffix(i)}"] = np.asarray(value)  # uint8 codes stay uint8
            else:
                tensors["exp_avg" + set_suffix(i)] = np.asarray(adam.exp_avg, np.float32)
                tensors["exp_avg_sq" + set_suffix(i)] = np.asarray(adam.exp_avg_sq, np.float32)
    state = {"seed": int(seed), "num_vectors": args.num_vectors, "placeholder_token": args.placeholder_token,
             "global_batch": plan.global_batch, "framework": framework, "text_encoders": len(vector_sets),
             "optimizer": optimizer, "optimizer_step": float(step), "learning_rate": plan.learning_rate,
             **(family_state or {})}
    return tensors, state


def stored_optimizer_sets(resume_path, state, tensors, count):
    """The optimizer state of each of the count vector sets in a checkpoint (None: saved before any update)."""
    step = int(state.get("optimizer_step", 0))
    if optimizer_of(state) == ADAMW_8BIT:
        sets = [{name: tensors[f"bnb_{name}{set_suffix(i)}"] for name in ADAM_8BIT_TENSORS
                 if f"bnb_{name}{set_suffix(i)}" in tensors} for i in range(count)]
        if not any(sets):
            return None
        if not all("state1" in s and "state2" in s for s in sets):
            raise UserError(f"checkpoint {resume_path!r} lacks part of its AdamW8bit state; "
                            "resume from another checkpoint-N or start a new --output_dir")
        return [Adam8bitState(s, step) for s in sets]
    if "exp_avg" not in tensors:
        return None
    return [AdamMoments(tensors["exp_avg" + set_suffix(i)], tensors["exp_avg_sq" + set_suffix(i)], step)
            for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a resumed run starts: its step, vector sets and optimizer state (AdamMoments or Adam8bitState per set;
    None: a new run)."""

    step: int = 0
    vector_sets: list = None
    adam_sets: list = None


def describe_encoders(count):
    return "SDXL (2 text encoders)" if count == 2 else "SD-1.x/2.x (1 text encoder)" if count == 1 else f"{count} text encoders"


def check_vector_set_count(resume_path, resume_tensors, count):
    """A checkpoint holds one vector set per text encoder: an SD-1.x/2.x one does not resume on SDXL, nor the reverse."""
    stored = sum(1 for i in range(len(resume_tensors)) if "vectors" + set_suffix(i) in resume_tensors)
    if stored != count:
        raise UserError(f"checkpoint {resume_path!r} was made for {describe_encoders(stored)}, this model is "
                        f"{describe_encoders(count)}; resume on the model it was trained with or start a new --output_dir")


def family_state(spec, trained_keys):
    """What a flow-family checkpoint records of its model: {"family", "encoders"} (the trained encoders' file keys).
    SD-1.x/2.x and SDXL checkpoints record nothing, keeping the layout both trainers have always read and written
    (their family follows from the number of vector sets)."""
    return {"family": spec.name, "encoders": list(trained_keys)} if spec.flow_matching else {}


def check_checkpoint_family(resume_path, resume_tensors, resume_state, spec, trained_keys):
    """A checkpoint resumes only on the family and trained encoders it was made with (spec: a core FamilySpec)."""
    recorded = resume_state.get("family")
    if recorded is None:  # SD-1.x/2.x or SDXL
        if spec.flow_matching:
            stored = sum(1 for i in range(len(resume_tensors)) if "vectors" + set_suffix(i) in resume_tensors)
            raise UserError(f"checkpoint {resume_path!r} was made for {describe_encoders(stored)}, this model is "
                            f"{spec.label}; resume on the model it was trained with or start a new --output_dir")
        check_vector_set_count(resume_path, resume_tensors, len(trained_keys))
        return
    made = f"{recorded} training {'+'.join(resume_state.get('encoders') or [])}"
    if recorded != spec.name or list(resume_state.get("encoders") or []) != list(trained_keys):
        raise UserError(f"checkpoint {resume_path!r} was made for {made}, this run is {spec.name} training "
                        f"{'+'.join(trained_keys)}; resume with the model (and --enable_t5_ti setting) it was trained "
                        "with or start a new --output_dir")


def resume_point(args, inputs, dims, plan, logger):
    """Check the checkpoint found by --resume_from_checkpoint against this run (dims: the width of each text
    encoder's vectors); return where to start."""
    if inputs.resume_state is None:
        if args.resume_from_checkpoint:
            logger.warning("--resume_from_checkpoint %s: no checkpoint in %s yet, starting a new run",
                           args.resume_from_checkpoint, args.output_dir)
        return Resume()
    state, tensors = inputs.resume_state, inputs.resume_tensors
    check_vector_set_count(inputs.resume_path, tensors, len(dims))
    stored = [tensors["vectors" + set_suffix(i)] for i in range(len(dims))]
    if state.get("num_vectors") != args.num_vectors or [v.shape[1] for v in stored] != list(dims):
        raise UserError(f"checkpoint {inputs.resume_path!r} was made with other --num_vectors or another model; "
                        "resume with the original settings or start a new --output_dir")
    if state.get("global_batch") != plan.global_batch:
        logger.warning("the checkpoint was trained with another global batch; the resumed run will not "
                       "match an uninterrupted one")
    adam_sets = stored_optimizer_sets(inputs.resume_path, state, tensors, len(dims))
    logger.info("resumed from %s at step %d", inputs.resume_path, int(state["step"]))
    return Resume(int(state["step"]), [np.asarray(v, np.float32) for v in stored], adam_sets)


# --------------------------------------------------------------------------------------------------
# The loop's bookkeeping


class StopSignals:
    """SIGINT/SIGTERM ask the loop to finish its step, save and exit; leaving the `with` block puts the
    previous handlers back (an in-process caller such as a notebook keeps its Ctrl-C)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = []
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
            except ValueError:  # not the main thread (e.g. under a test harness): no handler to install
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    @property
    def requested(self):
        return bool(self.received)


class LossLog:
    """Losses of this run, and per-step values logged beside them (the learned vectors' norms). They stay
    wherever the trainer computed them (a device) until the plan asks for them: then they are fetched together
    (one transfer), checked, and handed on for logging."""

    def __init__(self):
        self.pending = []  # (step, device loss, learning rate, {name: device value})
        self.history = []  # (step, loss) on the host, for loss.png
        self.last_extras = {}  # the newest fetched step's extra values, for the progress bar

    def add(self, step, loss, lr, extras=None):
        self.pending.append((step, loss, lr, dict(extras or {})))

    def fetch(self, to_host):
        """[(step, loss, lr, {name: value})] of the pending steps as floats; to_host(list of device values) ->
        floats, called once with every pending loss and extra value. A non-finite loss stops the run before
        anything of this step is saved."""
        if not self.pending:
            return []
        device_values = [loss for _, loss, _, _ in self.pending]
        for _, _, _, extras in self.pending:
            device_values += list(extras.values())
        values = [float(v) for v in to_host(device_values)]
        losses, rest = values[: len(self.pending)], iter(values[len(self.pending):])
        fetched = [(step, value, lr, {name: next(rest) for name in extras})
                   for (step, _, lr, extras), value in zip(self.pending, losses)]
        self.pending = []
        for step, value, _, _ in fetched:
            check_finite_loss(value, step)
        self.history += [(step, value) for step, value, _, _ in fetched]
        self.last_extras = fetched[-1][3]
        return fetched


def norm_postfix(extras):
    """The progress bar's view of the logged norms: norm (embedding_norm), norm_2 (SDXL's embedding_norm_2)."""
    return {name.replace("embedding_", ""): f"{value:.4f}" for name, value in extras.items()
            if name.startswith("embedding_norm")}


def check_finite_loss(value, step):
    if not math.isfinite(value):
        raise UserError(f"loss became {value} at step {step}; lower --learning_rate or use fp32. "
                        "The last saved embedding and checkpoint are untouched")


def check_finite_vectors(vector_sets, step):
    if not all(np.isfinite(np.asarray(v)).all() for v in vector_sets):
        raise UserError(f"the learned vectors became non-finite by step {step}; lower --learning_rate. "
                        "The last saved embedding and checkpoint are untouched")


def log_start(logger, plan, dataset, seed, devices_line):
    logger.info("***** Running training *****")
    logger.info("  images = %d, examples per epoch = %d, %s", dataset.num_images, len(dataset), devices_line)
    logger.info("  batch per device = %d, accumulation = %d, global batch = %d, steps = %d, seed = %d",
                plan.per_device_batch, plan.accumulation, plan.global_batch, plan.max_train_steps, seed)


def latent_shape(resolution, vae_config):
    """(channels, height, width) of the VAE latents of a resolution x resolution image."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    size = resolution // factor
    return (vae_config.latent_channels, size, size)


def check_prediction_type(prediction_type):
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"the model's scheduler predicts {prediction_type!r}; only epsilon and v_prediction are supported")


# --------------------------------------------------------------------------------------------------
# The examples of a step, on the host


class LatentCache:
    """VAE posterior (mean, std) per (image, flip), with buckets per (image, flip, crop) (the bucket is the
    image's), filled on first use (no start-up stall), exact: each sample is drawn from the cached posterior
    with the example's own noise.

    encode(list of CHW float32 pixel arrays of one shape) -> (means, stds), each a list of float32 arrays.
    on_full() runs once every key is cached (the trainer frees its VAE encoder there).
    """

    def __init__(self, dataset, encode, on_full=None):
        self.dataset, self.encode, self.on_full = dataset, encode, on_full
        self.entries = {}

    def __call__(self, keys):
        missing = [k for k in dict.fromkeys(keys) if k not in self.entries]
        if missing:
            # One picture per encode call: the VAE's kernels differ with the batch size, so a posterior encoded
            # beside whatever else a step happened to miss would depend on the step, and a run resumed mid-epoch
            # (which misses other keys together) would drift from the uninterrupted one in the last bits.
            for key in missing:
                (mean,), (std,) = self.encode([self.dataset.pixels(*key)])
                # C-contiguous: a framework's strided view (e.g. channels-last) would change which kernels run on it
                self.entries[key] = (np.ascontiguousarray(mean, np.float32), np.ascontiguousarray(std, np.float32))
            total = getattr(self.dataset, "num_latent_keys", 2 * self.dataset.num_images)
            if len(self.entries) == total and self.on_full is not None:
                self.on_full()
                self.on_full = None
        return (np.stack([self.entries[k][0] for k in keys]), np.stack([self.entries[k][1] for k in keys]))


def host_batch(plan, dataset, latents, seed, step, first_device, num_local_devices=1):
    """The inputs of these devices' share of optimizer step `step`, as numpy arrays shaped
    [accumulation, num_local_devices * per_device_batch, ...]:

    mean, std: the posterior of each example's (image, flip[, crop]); noise_seed: the seed of its posterior
    sample, noise and timestep (drawn by the trainer's framework); prompt: its row of all_prompt_ids;
    time_ids: int64 [original h, original w, crop top, crop left, target h, target w] (SDXL's
    micro-conditioning); mask (only with a masked loss): float32 [1, h, w] loss weights at latent resolution.
    With buckets every example of the step has its bucket's latent shape.
    """
    from .data import STREAM_NOISE, example_seed

    has_masks = getattr(dataset, "has_masks", False)
    fields = {"mean": [], "std": [], "noise_seed": [], "prompt": [], "time_ids": []}
    if has_masks:
        fields["mask"] = []
    for micro in range(plan.accumulation):
        indices = plan.example_indices(step, micro, first_device, num_local_devices)
        examples = [dataset.draw(i, plan.global_batch) for i in indices]
        keys = [dataset.latent_key(e) for e in examples]
        mean, std = latents(keys)
        fields["mean"].append(mean)
        fields["std"].append(std)
        fields["noise_seed"].append(np.array([example_seed(seed, i, STREAM_NOISE) for i in indices], np.uint64))
        fields["prompt"].append(np.array([e.prompt for e in examples], np.int64))
        fields["time_ids"].append(np.stack([dataset.time_ids(e) for e in examples]))
        if has_masks:
            fields["mask"].append(np.stack([dataset.latent_mask(k, mean.shape[-2:]) for k in keys]))
    return {name: np.stack(values) for name, values in fields.items()}


def output_vectors(vector_sets, encoders=None):
    """What the embedding writers take: the one array of an SD-1.x/2.x run, or SDXL's two sets named as the
    webui/ComfyUI SDXL files name them, {"clip_l": text_encoder's, "clip_g": text_encoder_2's}. encoders: the
    trained EncoderSpecs (families.trained_encoders), giving {file_key: set} in their order (SD3, Flux.1)."""
    if encoders is not None:
        return {encoder.file_key: np.asarray(v, np.float32) for encoder, v in zip(encoders, vector_sets)}
    if len(vector_sets) == 1:
        return np.asarray(vector_sets[0], np.float32)
    return {"clip_l": np.asarray(vector_sets[0], np.float32), "clip_g": np.asarray(vector_sets[1], np.float32)}
