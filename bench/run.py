#!/usr/bin/env python
"""Benchmark the trainers: seconds per step, time to first step, peak memory, final loss.

    python bench/run.py                    # everything (tiny and sd15: ~60 min; the Flax sd15 rows peak at ~19 GB RAM)
    python bench/run.py --only tiny        # configurations whose name contains "tiny"
    python bench/run.py --report           # only redraw results.md / results.png from results.json
    python bench/run.py --only sdxl-1024   # the SDXL-base-shaped rows at 1024 px (opt-in: ~14 GB disk, up to ~17 GB RAM)
    python bench/run.py --only sd35-medium # SD3.5-medium-shaped bf16 rows at 512 px (opt-in: ~16 GB disk, ~10.5 GB RAM)
    python bench/run.py --only flux-dev    # FLUX.1-dev-shaped: the text side, and the step's "does not fit"
    python bench/run.py --code_root DIR    # time the trainers of another checkout (e.g. a `git archive` of a commit)

Each configuration runs in a fresh process (bench/step_timer.py wraps the script unchanged), with
the same flags for our trainer, the plain reference loop (bench/reference_loop.py) and the Flax
trainer. Pipelines with random weights are generated under bench/pipelines/ when missing.
Results are merged into bench/results.json by configuration name (so a partial rerun keeps the
other rows), then bench/results.md and bench/results.png are redrawn from it. /proc/loadavg and the
CPU model are recorded with every run: the machine may be shared, and load inflates every timing.

The Flax trainer keeps the loss on the device between fetches (--logging_steps, default 10), so its
progress bar moves when a step is dispatched, not when it is done; its rows are timed between the
moments it shows a loss (step_timer.py's sync_points), which prove every earlier step finished.
A watchdog kills a run whose process tree passes its RSS limit (RSS_LIMIT_GB) or leaves less than
MIN_AVAILABLE_GB of the machine's memory available, so that a configuration too big for the machine
fails alone instead of swapping or waking the OOM killer for everyone else; a row with an expected peak
(EXPECTED_PEAK_GB) is not started while the machine has less than that (plus MIN_AVAILABLE_GB) available.

Flow-matching rows (SD3/SD3.5, Flux.1) also record the moment the trainer starts loading its image side
(bench/step_timer.py's BENCH_MARK): the peak RSS of the text side (tokenizers, text encoders, the frozen ones run
once per prompt and freed) and the RSS left when the transformer starts loading. TEXT_SIDE_ONLY rows stop there:
they measure the text side of a model whose transformer this machine cannot hold.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.readme_block import replace_block  # noqa: E402
from textual_inversion_core.atomic import atomic_path  # noqa: E402

WORK = os.path.join(HERE, "pipelines")  # git-ignored: pipelines, images, run outputs, logs
RESULTS_JSON = os.path.join(HERE, "results.json")
RESULTS_MD = os.path.join(HERE, "results.md")
RESULTS_PNG = os.path.join(HERE, "results.png")
NOTES_MD = os.path.join(HERE, "notes.md")  # hand-written analysis, appended to results.md
README_MD = os.path.join(ROOT, "README.md")
README_BEGIN, README_END = "<!-- bench tables: begin (written by bench/run.py) -->", "<!-- bench tables: end -->"
TORCH_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
FLAX_PYTHON = os.path.join(ROOT, ".venv-flax", "bin", "python")
SCRIPT_PATHS = {"ours": "textual_inversion.py", "reference": os.path.join("bench", "reference_loop.py"),
                "flax": "textual_inversion_flax.py"}  # inside a code root (this checkout by default)
SCRIPTS = {trainer: os.path.join(ROOT, path) for trainer, path in SCRIPT_PATHS.items()}
TRAINER_LABEL = {"ours": "textual_inversion.py", "reference": "reference loop",
                 "flax": "textual_inversion_flax.py"}

# (name, trainer, pipeline, resolution, batch, extra flags, warm-up steps, measured steps)
# Two training images: our trainer's latent cache (one VAE encode per image and flip, 4 in all)
# is full by step 5 with --seed 0, so the measured steps are the steady state users pay for
# over thousands of steps; `encode_steps` in results.json lists the steps that encoded.
NUM_IMAGES = 2
TINY_STEPS = (5, 30)
# Flax: warm-up and measured steps are multiples of its default --logging_steps (10), so the timed
# stretch runs from one loss fetch (a proof that all steps so far are done) to another.
TINY_FLAX_STEPS = (10, 30)
SD15_STEPS = (5, 5)
# The reference loop has no cache to fill: a shorter warm-up measures the same steady state.
SD15_REFERENCE_STEPS = (2, 4)
# SDXL-base-shaped pipeline at 1024 px: one warm-up step and two measured (each is tens of seconds
# to minutes on a CPU). One training image: its two (image, flip) latents are encoded in steps 1
# and 4 (encode_steps), so the measured steps 2-3 run from the cache, as the other rows' do.
SDXL_STEPS = (1, 2)
SDXL_IMAGES = 1
# Flow-matching rows at full size (SD3.5-medium and FLUX.1-dev architectures, bf16 random weights; see
# tools/big_flow_pipelines.py): 512 px (64 x 64 latents, 1024 transformer tokens in 2 x 2 patches), one warm-up step and
# two measured, one training image (as the SDXL rows).
BIG_FLOW_STEPS = (1, 2)
BIG_FLOW_RESOLUTION = 512
IMAGES = {"sdxl-1024": SDXL_IMAGES, "sd35-medium": SDXL_IMAGES, "flux-dev": SDXL_IMAGES}
# Rows that only run when --only names them (disk, memory and time: see bench/notes.md).
OPT_IN = ("sdxl-1024", "sd35-medium", "flux-dev")
# Watchdog: kill a run above this RSS (process tree) ...
RSS_LIMIT_GB = {"sdxl-1024": 20.0, "sd35-medium": 20.0, "sd35-medium-512-bf16-t5": 22.0, "flux-dev": 20.0}
# ... and any run that leaves less than this available (/proc/meminfo MemAvailable) to the machine.
MIN_AVAILABLE_GB = 1.5
# A row is not started while the machine has less than its expected peak (+ MIN_AVAILABLE_GB) available.
EXPECTED_PEAK_GB = {"sd35-medium": 11.0, "sd35-medium-512-bf16-t5": 20.5, "flux-dev": 10.5}  # measured: 10.46, 20.21, 10.0
# The trainer's method entered once the text side is done (BENCH_MARK of bench/step_timer.py) ...
TEXT_SIDE_MARK = "torch_backend.families.base:Family.load_image_side"
FLOW_PIPELINES = ("tiny-sd3", "tiny-flux", "sd35-medium", "flux-dev")
# ... and the rows that stop there (their transformer does not fit: see TOO_BIG).
# T5 at the trainer's Flux default of 512 tokens, and at 77 (SD3's default: 1/6.6 of the T5 work of caching).
TEXT_SIDE_ONLY = ("flux-dev-512-bf16-text-side-ours", "flux-dev-512-bf16-seq77-text-side-ours")
# Configurations that cannot fit on a 24 GB machine, with the memory they would need and how that
# was estimated; they are recorded as "does not fit" instead of being started (--force runs them).
_FLAX_SDXL_LOAD = ("the Flax trainer's loader alone peaks at ≈ 24.5 GB before the first step, in any precision: "
                   "it reads the fp32 UNet (10.27 GB) into numpy and keeps it while it writes the transposed Flax "
                   "copy (another ≈ 10.2 GB), with both text encoders and the VAE (3.6 GB fp32) already loaded and "
                   "cast to bf16 only afterwards; measured: text_encoder_2 alone (2.78 GB) peaks at 5.96 GB; "
                   "XLA's training activations come on top")
# SD3.5-medium and FLUX.1-dev (bf16 files): the trainer reads the transformer in the training's dtype (bf16: no fp32
# copy). Measured in the sd35-medium CLIP-only row (rss_trace_gb, commit c3c3f32 on): text side with all three encoders
# 10.35 GB, 1.02 GB left after T5 is freed, 10.46 GB peak during the steps (1.02 + 4.94 GB of bf16 transformer + the
# step's activations and optimizer ≈ 4.5 GB). Before c3c3f32 diffusers built the transformer in fp32 first: 16.2 GB.
# With T5 trained and resident the row fits an idle 24 GB machine (20.21 GB measured), so it runs, with its own limits.
_FLUX_DEV = ("the FLUX.1-dev transformer has 11.90 B parameters, 23.8 GB in bf16 alone (the trainer reads it in bf16), on "
             "top of what the text side leaves ({left}; flux-dev text-side row), plus the step's activations "
             "(≥ SD3.5-medium's ≈ 4.5 GB at 512 px): ≥ {total} GB")
TOO_BIG = {
    "sdxl-1024-bf16-chunked-attention-flax": (24.5, _FLAX_SDXL_LOAD),
    "sdxl-1024-fp32-chunked-attention-flax": (24.5, _FLAX_SDXL_LOAD),
    "flux-dev-512-bf16-ours": (29.2, _FLUX_DEV.format(left="CLIP-L, T5 cached at 512 tokens and freed: 0.94 GB measured",
                                                      total=29.2)),
    "flux-dev-512-bf16-t5-ours": (38.3, _FLUX_DEV.format(
        left="T5 trained and resident: 10.0 GB, the text side's weights measured at 77 tokens", total=38.3)),
}


# Step scores (issue 21): what a scored step adds to training, on the tiny pipeline and on the shapes model. Each
# pipeline runs three rows in one session: no scores, the validation loss on SCORE_HELD_OUT held-out images
# (--validation_data_dir) and the CLIP scores (--eval_clip_model); every row saves at SCORE_EVERY steps, so the
# steps that follow a save are compared with the rows' other steps (scoring_summary). The tiny pipeline scores with
# a random tiny CLIP at the flags' defaults; the shapes model (tests/assets/shapes-sd) with the shapes CLIP at the
# settings of `make demo` (tools/shapes.SCORING_FLAGS) and the recipe's batch; one thread (SCORE_ENV).
SCORE_STEPS = (5, 30)
SCORE_EVERY = 10
SCORE_HELD_OUT = 5
SHAPES_ASSET = os.path.join(ROOT, "tests", "assets", "shapes-sd")
SCORE_KINDS = ("none", "validation", "clip")
SCORE_ENV = {"OMP_NUM_THREADS": "1"}  # one thread, as `make demo` and the tests train the shapes model


def score_flags(pipeline, kind):
    """The flags of a step-score row; {held_out} and {tiny_clip} are folders made when the row runs (score_inputs)."""
    flags = ["--save_steps", str(SCORE_EVERY)]
    if kind == "validation":
        flags += ["--validation_data_dir", "{held_out}"]
    elif kind == "clip" and pipeline == "tiny":
        flags += ["--eval_clip_model", "{tiny_clip}"]
    elif kind == "clip":
        from tools import shapes

        flags += [f"--{k}={v}" for k, v in shapes.SCORING_FLAGS.items()]
    return flags


def score_inputs(flags):
    """The score rows' placeholders replaced by folders (made under bench/pipelines/ when missing)."""
    def resolve(flag):
        if flag == "{held_out}":
            return ensure_images(SCORE_HELD_OUT)
        if flag == "{tiny_clip}":
            path = os.path.join(WORK, "tiny-clip")
            if not os.path.isfile(os.path.join(path, "config.json")):
                subprocess.run([TORCH_PYTHON, "-c", "import sys; sys.path.insert(0, sys.argv[2]); "
                                "from tools.make_tiny_pipeline import make_tiny_clip; make_tiny_clip(sys.argv[1])",
                                path, ROOT], check=True)
            return path
        return flag

    return [resolve(f) for f in flags]


def configurations():
    configs = []
    for batch in (1, 4):
        for trainer in ("ours", "reference", "flax"):
            steps = TINY_FLAX_STEPS if trainer == "flax" else TINY_STEPS
            configs.append((f"tiny-b{batch}-{trainer}", trainer, "tiny", 64, batch, [], *steps))
    # The tiny SDXL pipeline (two text encoders, both trained); the reference loop is SD-1.x only.
    for batch in (1, 4):
        for trainer in ("ours", "flax"):
            steps = TINY_FLAX_STEPS if trainer == "flax" else TINY_STEPS
            configs.append((f"tiny-sdxl-b{batch}-{trainer}", trainer, "tiny-sdxl", 64, batch, [], *steps))
    sd15 = [("fp32", []), ("bf16", ["--mixed_precision", "bf16"]), ("gc", ["--gradient_checkpointing"])]
    for variant, flags in sd15:
        for trainer in ("ours", "reference"):
            steps = SD15_REFERENCE_STEPS if trainer == "reference" else SD15_STEPS
            configs.append((f"sd15-{variant}-{trainer}", trainer, "sd15", 512, 1, flags, *steps))
    # Flax: no --gradient_checkpointing (diffusers' Flax UNet has none); fp32 and bf16.
    configs.append(("sd15-fp32-flax", "flax", "sd15", 512, 1, [], *SD15_STEPS))
    configs.append(("sd15-bf16-flax", "flax", "sd15", 512, 1, ["--mixed_precision", "bf16"], *SD15_STEPS))
    # Flax's counterpart of --enable_xformers_memory_efficient_attention: chunked attention (memory).
    configs.append(("sd15-fp32-chunked-attention-flax", "flax", "sd15", 512, 1,
                    ["--enable_xformers_memory_efficient_attention"], *SD15_STEPS))
    for pipeline, resolution, batch in (("tiny", 64, 1), ("shapes", 32, 8)):
        for kind in SCORE_KINDS:
            configs.append((f"{pipeline}-scores-{kind}-ours", "ours", pipeline, resolution, batch,
                            score_flags(pipeline, kind), *SCORE_STEPS))
    # SDXL base 1.0's architecture at its native 1024 px, batch 1 (opt-in, see OPT_IN).
    bf16, gc = ["--mixed_precision", "bf16"], ["--gradient_checkpointing"]
    for variant, flags in (("bf16", bf16), ("bf16-gc", bf16 + gc), ("gc", gc), ("fp32", [])):
        configs.append((f"sdxl-1024-{variant}-ours", "ours", "sdxl", 1024, 1, flags, *SDXL_STEPS))
    chunked = ["--enable_xformers_memory_efficient_attention"]
    for variant, flags in (("bf16-chunked-attention", bf16 + chunked), ("fp32-chunked-attention", chunked)):
        configs.append((f"sdxl-1024-{variant}-flax", "flax", "sdxl", 1024, 1, flags, *SDXL_STEPS))
    # SD3 and Flux.1 (our trainer only): CLIP encoders trained and T5 cached once per prompt and freed (the
    # default), or T5 trained too and resident (--enable_t5_ti).
    t5 = ["--enable_t5_ti"]
    for size in ("tiny-sd3", "tiny-flux"):
        for variant, flags in (("", []), ("-t5", t5)):
            configs.append((f"{size}{variant}-b1-ours", "ours", size, 64, 1, flags, *TINY_STEPS))
    for size in ("sd35-medium", "flux-dev"):
        for variant, flags in (("bf16", bf16), ("bf16-t5", bf16 + t5)):
            configs.append((f"{size}-{BIG_FLOW_RESOLUTION}-{variant}-ours", "ours", size, BIG_FLOW_RESOLUTION, 1,
                            flags, *BIG_FLOW_STEPS))
    configs.append((TEXT_SIDE_ONLY[0], "ours", "flux-dev", BIG_FLOW_RESOLUTION, 1, bf16, *BIG_FLOW_STEPS))
    configs.append((TEXT_SIDE_ONLY[1], "ours", "flux-dev", BIG_FLOW_RESOLUTION, 1, bf16 + ["--max_sequence_length", "77"],
                    *BIG_FLOW_STEPS))
    return configs


def prefixed(table, name, default=None):
    """table's value for the longest key that starts name (per-family settings such as RSS_LIMIT_GB)."""
    keys = [k for k in table if name.startswith(k)]
    return table[max(keys, key=len)] if keys else default


# --------------------------------------------------------------------------------------------------
# Inputs


def ensure_pipeline(size):
    if size == "shapes":  # the pretrained shapes model the tests and `make demo` use
        return SHAPES_ASSET
    path = os.path.join(WORK, size)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        print(f"[bench] generating the {size} pipeline in {path} (random weights)", flush=True)
        subprocess.run([TORCH_PYTHON, os.path.join(ROOT, "tools", "make_tiny_pipeline.py"), path, "--size", size],
                       check=True)
    return path


def ensure_images(count=NUM_IMAGES, size=512):
    """A few deterministic synthetic photos (gradients and shapes); content does not affect speed.
    The folder holds exactly `count` images (images/ for the default count, images-N/ otherwise);
    the first N of every folder are the same pictures."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = os.path.join(WORK, "images" if count == NUM_IMAGES else f"images-{count}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(folder, f"concept-{i}.png")
        if os.path.isfile(path):
            continue
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(80, 200, 3) + rng.uniform(0, 50, 3)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 64, 2)
            w, h = rng.integers(32, size // 2, 2)
            draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    return folder


def encode_steps(images, batch, steps, repeats=100, seed=0):
    """1-based steps in which textual_inversion.py meets an (image, flip) not yet in its latent cache.

    Its draws are pure functions of (seed, example index), so this is known without running it.
    """
    from textual_inversion_core.data import TextualInversionDataset

    dataset = TextualInversionDataset(images, size=8, repeats=repeats, seed=seed)
    seen, found = set(), []
    for step in range(steps):
        keys = {dataset.example(step * batch + i)[:2] for i in range(batch)}
        if keys - seen:
            found.append(step + 1)
        seen |= keys
    return found


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def code_label(root):
    """What code a run timed: the commit (and -dirty) of a git checkout, else the folder's name."""
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--exclude", "*"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and os.path.isdir(os.path.join(root, ".git")):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.basename(os.path.abspath(root))


def synced_blocks(timing, warmup):
    """[(seconds per step, steps)] of each stretch between consecutive loss fetches after the warm-up.

    A fetch brings the loss of the latest step to the host, which cannot happen before every step
    so far is computed; between two fetches the time per step is therefore exact even when the
    trainer dispatches steps ahead of the device (JAX). A trainer that fetches every step gives one
    block per step, the same numbers as the per-step intervals."""
    return _blocks(timing, warmup, 1)


def _blocks(timing, warmup, column):
    points = []
    for point in timing.get("sync_points", []):
        steps = point[0]
        if steps >= warmup and len(point) > column and (not points or steps > points[-1][0]):
            points.append((steps, point[column]))
    return [((t1 - t0) / (n1 - n0), n1 - n0) for (n0, t0), (n1, t1) in zip(points, points[1:])]


# --------------------------------------------------------------------------------------------------
# One run


def tree_rss(proc):
    """Resident bytes of a process and all its descendants, now."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def kill_tree(proc):
    """Kill a process we started and its descendants (by pid)."""
    import psutil

    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.Error:
        procs = [proc]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def run_one(config, images, profile_step=None, code_root=ROOT, extra_flags=(), tag=None, max_rss_gb=None,
            force=False, env_extra=None):
    """Run one configuration in a fresh process and return its result row.

    code_root: the checkout whose trainers are timed; extra_flags are appended to the configuration's;
    tag names the run's log/output files (default: the configuration's name); max_rss_gb overrides
    the configuration's RSS limit (RSS_LIMIT_GB); env_extra is added to the run's environment (e.g.
    OMP_NUM_THREADS). A configuration in TOO_BIG is not started unless force."""
    import psutil

    name, trainer, size, resolution, batch, extra, warmup, measured = config
    extra = score_inputs(list(extra) + list(extra_flags))
    tag = tag or name
    script = os.path.join(code_root, SCRIPT_PATHS[trainer])
    python = FLAX_PYTHON if trainer == "flax" else TORCH_PYTHON
    result = {"name": name, "trainer": trainer, "pipeline": size, "resolution": resolution, "batch": batch,
              "flags": extra, "warmup_steps": warmup, "measured_steps": measured, "cpu": machine_info()["cpu"],
              "code": code_label(code_root)}
    if name in TOO_BIG and not force:
        needed_gb, how = TOO_BIG[name]
        result.update(status="does not fit", needed_gb=needed_gb, error=f"needs ≈ {needed_gb:.0f} GB: {how}",
                      measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        return result
    if not os.path.isfile(script):
        result.update(status="missing", error=f"{os.path.relpath(script, ROOT)} does not exist in this checkout")
        return result
    if not os.path.isfile(python):
        result.update(status="missing", error=f"{os.path.relpath(python, ROOT)} does not exist (make setup-flax)")
        return result
    expected_gb, available = prefixed(EXPECTED_PEAK_GB, name), mem_available_bytes()
    if expected_gb and available is not None and available < (expected_gb + MIN_AVAILABLE_GB) * 1e9:
        result.update(status="not started", measured_at=datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"), error=f"the machine had {available / 1e9:.1f} GB available and this row peaks at "
                                         f"≈ {expected_gb:g} GB (+ {MIN_AVAILABLE_GB:g} GB kept free): try again later")
        return result
    out_dir = os.path.join(WORK, "runs", tag)
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    timing_file = os.path.join(WORK, "logs", f"{tag}.timing.json")
    log_file = os.path.join(WORK, "logs", f"{tag}.log")
    for stale in (timing_file, os.path.splitext(timing_file)[0] + ".profile.txt"):
        if os.path.exists(stale):
            os.unlink(stale)
    flags = ["--pretrained_model_name_or_path", ensure_pipeline(size), "--train_data_dir", images,
             "--placeholder_token", "<bench-concept>", "--initializer_token", "toy",
             "--resolution", str(resolution), "--train_batch_size", str(batch),
             "--max_train_steps", str(warmup + measured), "--learning_rate", "5e-4", "--lr_warmup_steps", "0",
             "--seed", "0", "--output_dir", out_dir, "--save_steps", "0", "--checkpointing_steps", "0",
             "--report_to", "none", "--export_formats", "diffusers"] + extra
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0")
    if trainer != "flax":
        env["BENCH_LOG_HOOK"] = "accelerate"
    if profile_step is not None:
        env["BENCH_PROFILE_STEP"] = str(profile_step)
    if size in FLOW_PIPELINES and trainer == "ours":
        env["BENCH_MARK"] = TEXT_SIDE_MARK
        if name in TEXT_SIDE_ONLY:
            env["BENCH_STOP_AT_MARK"] = "1"
    env.update(env_extra or {})
    if env_extra:
        result["env"] = dict(env_extra)
    result["threads"] = int(env.get("OMP_NUM_THREADS") or os.cpu_count())  # torch's intra-op threads
    malloc = {k: v for k, v in env.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if malloc:  # glibc settings change peak RSS (and time): recorded with the row
        result["malloc_env"] = malloc
    limit_gb = max_rss_gb if max_rss_gb is not None else prefixed(RSS_LIMIT_GB, name)
    result["loadavg_start"] = loadavg()
    load_samples = []
    peak_tree = 0
    killed = None
    rss_trace = []  # [seconds since start, GB] every 2 s, kept for rows with an RSS limit (the big ones)
    next_trace = time.time()
    print(f"[bench] {tag}: {warmup}+{measured} steps (load {result['loadavg_start']}"
          f"{f', RSS limit {limit_gb:g} GB' if limit_gb else ''})", flush=True)
    start = time.time()
    with open(log_file, "w") as log:
        child = subprocess.Popen([python, os.path.join(HERE, "step_timer.py"), timing_file, script] + flags,
                                 cwd=code_root, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        next_load = start
        while child.poll() is None:
            rss = tree_rss(watched)
            peak_tree = max(peak_tree, rss)
            if limit_gb and time.time() >= next_trace:
                rss_trace.append([round(time.time() - start, 1), round(rss / 1e9, 2)])
                next_trace += 2.0
            available = mem_available_bytes()
            if killed is None and limit_gb and rss > limit_gb * 1e9:
                killed = f"killed by the watchdog at {rss / 1e9:.1f} GB RSS (limit {limit_gb:g} GB)"
            elif killed is None and available is not None and available < MIN_AVAILABLE_GB * 1e9:
                killed = (f"killed by the watchdog at {rss / 1e9:.1f} GB RSS: the machine had "
                          f"{available / 1e9:.1f} GB available (minimum {MIN_AVAILABLE_GB:g} GB)")
            if killed:
                kill_tree(watched)
                child.wait()
                break
            if time.time() >= next_load:
                load_samples.append(float(loadavg().split()[0]))
                next_load += 5.0
            time.sleep(0.1)
    wall = time.time() - start
    result.update(loadavg_end=loadavg(), loadavg_1min_mean=round(statistics.fmean(load_samples), 2),
                  wall_s=round(wall, 2), exit_code=child.returncode, log=os.path.relpath(log_file, ROOT),
                  measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if rss_trace:
        result["rss_trace_gb"] = rss_trace
    timing = {}
    if os.path.isfile(timing_file):
        with open(timing_file) as f:
            timing = json.load(f)
    ends = timing.get("step_end_times", [])
    for mark in timing.get("marks", [])[:1]:  # the text side's peak, and what it left resident
        result.update(text_side_peak_rss_gb=round(mark["peak_rss_bytes"] / 1e9, 3),
                      rss_at_image_side_gb=round(mark["rss_bytes"] / 1e9, 3),
                      text_side_s=round(mark["time"] - start, 1))
    if name in TEXT_SIDE_ONLY and not killed and child.returncode == 0 and "text_side_peak_rss_gb" in result:
        result.update(status="text side only", peak_rss_gb=result["text_side_peak_rss_gb"],
                      error="stopped as the transformer starts loading (it does not fit: see the step rows)")
        return result
    if killed:
        result.update(status="killed", steps_done=len(ends), peak_rss_gb=round(peak_tree / 1e9, 3),
                      error=f"{killed} after {wall:.0f} s, {len(ends)} steps done")
        return result
    if child.returncode != 0 or len(ends) < warmup + measured:
        with open(log_file, errors="replace") as f:
            tail = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-3:]
        result.update(status="failed", steps_done=len(ends), error=" | ".join(tail)[-400:])
        return result
    intervals = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    cpu = timing.get("step_cpu_times", [])
    cpu_intervals = [b - a for a, b in zip(cpu[warmup - 1:], cpu[warmup:])]
    if trainer == "flax":
        # Between loss fetches only (see synced_blocks); per-step bar times may be dispatch times.
        blocks = synced_blocks(timing, warmup)
        if not blocks:
            result.update(status="failed", steps_done=len(ends),
                          error="no two loss fetches after the warm-up to time between")
            return result
        result["synced_blocks"] = [[round(s, 4), n] for s, n in blocks]
        result["dispatch_intervals_s"] = [round(x, 4) for x in intervals]
        intervals = [s for s, n in blocks for _ in range(n)]  # each step of a block at its block's rate
        cpu_intervals = [s for s, n in _blocks(timing, warmup, 2) for _ in range(n)]
    losses = timing.get("logged_losses") or timing.get("losses") or []
    peak_self = timing.get("peak_rss_bytes") or 0
    result.update(
        status="ok",
        s_per_step_median=round(statistics.median(intervals), 4),
        s_per_step_mean=round(statistics.fmean(intervals), 4),
        s_per_step_min=round(min(intervals), 4),
        first_step_s=round(ends[0] - start, 2),
        peak_rss_gb=round(max(peak_self, peak_tree) / 1e9, 3),
        peak_rss_vmhwm_gb=round(peak_self / 1e9, 3),
        final_loss=losses[-1] if losses else None,
        losses=[round(x, 6) for x in losses],
        step_intervals_s=[round(x, 4) for x in intervals],
    )
    if cpu_intervals:  # process CPU time per step (all threads): less sensitive to other load than wall time
        result["cpu_s_per_step_median"] = round(statistics.median(cpu_intervals), 4)
    if trainer == "ours":
        result["encode_steps"] = encode_steps(images, batch, warmup + measured)
    if "-scores-" in name:
        result["after_save_steps"] = after_save(warmup, measured)
    result["images"] = os.path.relpath(images, ROOT)
    profile = os.path.splitext(timing_file)[0] + ".profile.txt"
    if os.path.isfile(profile):
        result["profile"] = os.path.relpath(profile, ROOT)
    return result


def after_save(warmup, measured, every=SCORE_EVERY):
    """Indices into step_intervals_s of the intervals that hold a save step's work: the trainer saves (and scores)
    step k after its bar moves to k, so the interval ending at step k + 1 holds it."""
    return [k - warmup for k in range(every, warmup + measured, every) if k >= warmup]


# --------------------------------------------------------------------------------------------------
# Reports


def scoring_summary(results):
    """Per pipeline, the seconds a scored step adds: for each score row, the median interval of the steps after a
    save minus the median of its other steps, less what a save alone adds (the no-score row's same number)."""
    summary = {}
    for pipeline in ("tiny", "shapes"):
        rows = {kind: results.get(f"{pipeline}-scores-{kind}-ours") for kind in SCORE_KINDS}
        if not all(r and r.get("status") == "ok" and r.get("after_save_steps") for r in rows.values()):
            continue
        extra = {}
        for kind, r in rows.items():
            saved = [r["step_intervals_s"][i] for i in r["after_save_steps"]]
            others = [x for i, x in enumerate(r["step_intervals_s"]) if i not in r["after_save_steps"]]
            extra[kind] = {"first": saved[0] - statistics.median(others),
                           "later": statistics.median(saved[1:]) - statistics.median(others),
                           "step": statistics.median(others)}
        summary[pipeline] = {
            kind: {"added_first_s": round(extra[kind]["first"] - extra["none"]["first"], 3),
                   "added_s": round(extra[kind]["later"] - extra["none"]["later"], 3),
                   "train_step_s": round(extra[kind]["step"], 4),
                   "loadavg_start": rows[kind]["loadavg_start"], "cpu": rows[kind]["cpu"],
                   "measured_at": rows[kind]["measured_at"]}
            for kind in SCORE_KINDS if kind != "none"}
    return summary


def scoring_lines(results):
    """The step-score table (markdown lines) for results.md and the README."""
    summary = scoring_summary(results)
    if not summary:
        return []
    machines = machine_labels(results)
    what = {"validation": f"validation loss ({SCORE_HELD_OUT} held-out images, {SCORE_HELD_OUT * 10} draws)",
            "clip": "CLIP scores (reconstruction + editability)"}
    setting = {"tiny": "tiny, 64 px, batch 1; a random tiny CLIP, 4 pictures x 5 prompts, 25 sampler steps",
               "shapes": "shapes-sd, 32 px, batch 8; the shapes CLIP, 8 pictures x 5 prompts, 20 sampler steps"}
    out = ["Step scores (issue 21): seconds a scored step adds to training (the median over the scored steps after "
           "the first, each the step after a save against the row's other steps, less what a save alone adds); the "
           "first scored step also measures the initializer's reference once. Rows `*-scores-*` above, run one "
           "after the other.", "",
           "| pipeline | scored | training step (s) | added per scored step (s) | = training steps | first scored step "
           "(s) | load avg at start | machine | measured at |", "|---|---|---:|---:|---:|---:|---|---|---|"]
    for pipeline, kinds in summary.items():
        for kind, r in kinds.items():
            out.append(f"| {setting[pipeline]} | {what[kind]} | {r['train_step_s']:.3f} | {r['added_s']:.2f} "
                       f"| {r['added_s'] / r['train_step_s']:.0f} | {r['added_first_s']:.2f} | {r['loadavg_start']} "
                       f"| {machines.get(r['cpu'], '?')} | {r['measured_at']} |")
    return out


def counterpart(results, name):
    """The reference-loop run with the same pipeline, resolution, batch and flags."""
    for trainer in ("ours", "flax"):
        if name.endswith("-" + trainer):
            other = results.get(name[: -len(trainer)] + "reference")
            return other if other and other.get("status") == "ok" else None
    return None


def speedup(results, row):
    ref = counterpart(results, row["name"])
    if row.get("status") != "ok" or ref is None:
        return None
    return ref["s_per_step_median"] / row["s_per_step_median"]


def fmt(value, spec, empty="–"):
    return empty if value is None else format(value, spec)


def targets(results):
    """(target, measured, verdict) lines of the issue's targets, from whatever was measured."""
    lines = []
    get = lambda n: results.get(n) if results.get(n, {}).get("status") == "ok" else None  # noqa: E731
    fp32, bf16, ref32 = get("sd15-fp32-ours"), get("sd15-bf16-ours"), get("sd15-fp32-reference")
    if fp32:
        lines.append(("sd15 fp32 ≤ 7.5 s/step", f"{fp32['s_per_step_median']:.2f} s/step",
                      fp32["s_per_step_median"] <= 7.5))
        lines.append(("sd15 fp32 peak RSS ≤ 5.5 GB", f"{fp32['peak_rss_gb']:.2f} GB", fp32["peak_rss_gb"] <= 5.5))
    if bf16:
        lines.append(("sd15 bf16 ≤ 5 s/step", f"{bf16['s_per_step_median']:.2f} s/step", bf16["s_per_step_median"] <= 5.0))
    if fp32 and bf16 and fp32["losses"] and bf16["losses"]:
        n = min(len(fp32["losses"]), len(bf16["losses"]))
        diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(fp32["losses"][:n], bf16["losses"][:n])]
        lines.append(("sd15 bf16 loss within noise of fp32 (same seeded steps)",
                      f"max relative difference {max(diffs):.2%} over {n} steps "
                      f"(mean loss {statistics.fmean(fp32['losses'][:n]):.4f} vs {statistics.fmean(bf16['losses'][:n]):.4f})",
                      max(diffs) <= 0.05))
    for batch in (1, 4):
        ours = get(f"tiny-b{batch}-ours")
        if ours and speedup(results, ours) is not None:
            ratio = speedup(results, ours)
            lines.append((f"tiny batch {batch} ≥ 2× the reference loop's steps/s", f"{ratio:.2f}×", ratio >= 2.0))
    if fp32 and ref32:
        lines.append(("sd15 time to first step not worse than the reference loop's",
                      f"{fp32['first_step_s']:.1f} s vs {ref32['first_step_s']:.1f} s",
                      fp32["first_step_s"] <= ref32["first_step_s"]))
    return lines


def write_markdown(data):
    results = data["runs"]
    out = ["# Benchmark results", "",
           "Generated by `make bench` (`bench/run.py`) from `bench/results.json`; do not edit by hand. "
           "Random-weight pipelines from `tools/make_tiny_pipeline.py` (`tiny`: 64 px; `sd15`: the SD-1.5 "
           "architecture, 512 px; `tiny-sdxl`: a tiny SDXL pipeline, 64 px; `sdxl`: SDXL base 1.0's "
           "architecture, 1024 px; `tiny-sd3` / `tiny-flux`: tiny SD3 and Flux.1 pipelines, 64 px; `sd35-medium` / "
           "`flux-dev`: the architectures of SD3.5 medium and FLUX.1-dev in bf16, 512 px, see "
           "`tools/big_flow_pipelines.py`). s/step is the median over the measured steps after the warm-up steps "
           "(Flax rows: over the stretches between loss fetches, the only moments its steps are known to be done); "
           "time to first step counts from process start (imports, model loading, first step); peak RSS "
           "is the OS high-water mark of the trainer process (and its children, sampled). Speed-up is the "
           "reference loop's s/step over this row's (the reference row of the same configuration, run next to it). "
           "Load average (1/5/15 min, /proc/loadavg) is recorded at the start of each run: on a shared "
           "machine a load above the core count inflates every number in that row. Rows measured on "
           "different machines or sessions are not comparable with each other: the machine column says which.", "",
           "Machines: " + "; ".join(f"{label} = {cpu}" for cpu, label in machine_labels(results).items())
           + f", {data.get('machine', {}).get('cores', '?')} cores, torch threads = cores unless the machine column "
           "says otherwise (OMP_NUM_THREADS).", ""] + table_lines(results)
    out += ["", "![s/step and peak RSS per configuration](results.png)", ""]
    if os.path.isfile(NOTES_MD):
        with open(NOTES_MD) as f:
            out += [f.read().rstrip(), ""]
    with atomic_path(RESULTS_MD) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(out))


def machine_labels(results):
    """{cpu model: short label} of the machines the rows were measured on, in order of first use."""
    labels = {}
    for r in results.values():
        cpu = r.get("cpu", "?")
        if cpu not in labels:
            labels[cpu] = chr(ord("A") + len(labels))
    return labels


def table_lines(results):
    """The results table and the targets table (markdown lines), for results.md and the README."""
    order = [c[0] for c in configurations()]
    rows = [results[n] for n in order if n in results] + [r for n, r in results.items() if n not in order]
    machines = machine_labels(results)
    out = ["| configuration | trainer | s/step (median) | steps/s | speed-up vs reference | time to first step (s) "
           "| peak RSS (GB) | final loss | steps (warm-up + measured) | load avg at start | machine | measured at |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        label = r["name"].rsplit("-", 1)[0]
        if r.get("malloc_env"):
            label += " (" + ", ".join(f"{k}={v}" for k, v in r["malloc_env"].items()) + ")"
        trainer = TRAINER_LABEL.get(r["trainer"], r["trainer"])
        steps = f"{r['warmup_steps']} + {r['measured_steps']}"
        machine = machines.get(r.get("cpu", "?"), "?")
        if r.get("threads") and r["threads"] != os.cpu_count():
            machine += f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
        if r.get("status") != "ok":
            reason = r.get("status", "?") + ": " + str(r.get("error", "")).replace("|", "/")
            peak = f"≥ {r['peak_rss_gb']:.2f}" if r.get("peak_rss_gb") else "–"
            if r.get("status") == "text side only":
                peak = f"{r['peak_rss_gb']:.2f}"
            out.append(f"| {label} | {trainer} | – | – | – | – | {peak} | – | {steps} | {r.get('loadavg_start', '–')} "
                       f"| {machine} | {r.get('measured_at', '–')} ({reason}) |")
            continue
        ratio = speedup(results, r)
        out.append(f"| {label} | {trainer} | {r['s_per_step_median']:.3f} | {1 / r['s_per_step_median']:.2f} "
                   f"| {fmt(ratio, '.2f')}{'×' if ratio else ''} | {r['first_step_s']:.1f} | {r['peak_rss_gb']:.2f} "
                   f"| {fmt(r['final_loss'], '.4f')} | {steps} | {r['loadavg_start']} | {machine} | {r['measured_at']} |")
    flow = [r for r in rows if r.get("text_side_peak_rss_gb") is not None]
    if flow:
        out += ["", "SD3/Flux rows, text side (until the transformer starts loading: tokenizers, text encoders, the "
                "frozen ones run once per prompt and freed):", "",
                "| configuration | T5 | text side peak RSS (GB) | RSS when the transformer starts loading (GB) "
                "| text side (s, from process start) |", "|---|---|---:|---:|---:|"]
        for r in flow:
            t5 = "trained, resident" if "--enable_t5_ti" in r["flags"] else "cached, freed"
            out.append(f"| {r['name'].rsplit('-', 1)[0]} | {t5} | {r['text_side_peak_rss_gb']:.2f} "
                       f"| {r['rss_at_image_side_gb']:.2f} | {r['text_side_s']:.0f} |")
        if any("--enable_t5_ti" in r["flags"] for r in flow):
            out += ["", "A trained T5 runs first in the training step: its weights, memory-mapped from the bf16 file, "
                    "count in RSS only from then on, so its text-side columns leave it out and its step row's peak "
                    "RSS has it."]
    out += ["", "Targets of issue 6:", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, ok in targets(results):
        out.append(f"| {target} | {measured} | {'yes' if ok else '**no**'} |")
    scoring = scoring_lines(results)
    return out + ([""] + scoring if scoring else [])


def update_readme(results):
    """Replace the tables between the README's bench markers, so the README quotes the latest results."""
    replace_block(README_MD, README_BEGIN, README_END, table_lines(results), "bench")


def write_plot(data):
    """Horizontal bars, s/step and peak RSS, one panel pair per pipeline size (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    results = data["runs"]
    order = [c[0] for c in configurations()]
    colours = {"ours": (31, 119, 180), "reference": (214, 39, 40), "flax": (44, 160, 44)}
    font = ImageFont.load_default()
    groups = [(size, [results[n] for n in order if n in results and results[n]["pipeline"] == size
                      and results[n].get("status") == "ok"])
              for size in ("tiny", "tiny-sdxl", "sd15", "sdxl", "tiny-sd3", "tiny-flux", "sd35-medium")]
    groups = [(s, rows) for s, rows in groups if rows]
    bar_h, label_w, panel_w, pad = 18, 190, 330, 14
    height = pad + sum(40 + len(rows) * (bar_h + 6) for _, rows in groups) + 40
    width = label_w + 2 * (panel_w + 70) + pad
    image = Image.new("RGB", (width, max(height, 120)), "white")
    draw = ImageDraw.Draw(image)
    y = pad
    for size, rows in groups:
        draw.text((pad, y), f"{size} pipeline", fill="black", font=font)
        for col, (key, unit) in enumerate((("s_per_step_median", "s/step (median)"), ("peak_rss_gb", "peak RSS (GB)"))):
            x0 = label_w + col * (panel_w + 70)
            draw.text((x0, y), unit, fill="black", font=font)
            top = max(r[key] for r in rows) or 1.0
            for i, r in enumerate(rows):
                by = y + 20 + i * (bar_h + 6)
                if col == 0:
                    draw.text((pad, by + 3), r["name"].rsplit("-", 1)[0] + " / " + r["trainer"], fill="black", font=font)
                length = max(1, int(panel_w * r[key] / top))
                draw.rectangle([x0, by, x0 + length, by + bar_h], fill=colours.get(r["trainer"], (120, 120, 120)))
                draw.text((x0 + length + 4, by + 3), f"{r[key]:.3g}", fill="black", font=font)
        y += 40 + len(rows) * (bar_h + 6)
    draw.text((pad, y), "blue: textual_inversion.py   red: reference loop (VAE every step, full-matrix AdamW)   "
              "green: Flax", fill="black", font=font)
    with atomic_path(RESULTS_PNG) as tmp:
        image.save(tmp, format="PNG")


def machine_info():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark the Textual Inversion trainers.")
    parser.add_argument("--only", action="append", default=[],
                        help="run only configurations whose name contains this (repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="skip configurations whose name contains this")
    parser.add_argument("--report", action="store_true", help="only redraw results.md and results.png")
    parser.add_argument("--profile_step", type=int, default=None,
                        help="profile two steps after this many (torch scripts) into bench/pipelines/logs/")
    parser.add_argument("--code_root", default=ROOT,
                        help="checkout whose trainers are timed (default: this one), e.g. a `git archive` of a commit")
    parser.add_argument("--max_rss_gb", type=float, default=None,
                        help="watchdog: kill a run whose process tree passes this RSS (default: RSS_LIMIT_GB per row)")
    parser.add_argument("--force", action="store_true", help="also start the configurations in TOO_BIG")
    args = parser.parse_args(argv)

    data = {"runs": {}}
    if os.path.isfile(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            data = json.load(f)
    for row in data["runs"].values():  # rows from before the cpu field: the machine recorded then
        row.setdefault("cpu", data.get("machine", {}).get("cpu", "?"))
    data["machine"] = machine_info()
    if not args.report:
        def wanted(name):
            if any(name.startswith(p) for p in OPT_IN):  # opt-in rows: only when an --only naming them chose them
                return any(o in name and p in o for o in args.only for p in OPT_IN if name.startswith(p))
            return not args.only or any(o in name for o in args.only)

        chosen = [c for c in configurations() if wanted(c[0]) and not any(s in c[0] for s in args.skip)]
        measured = {}
        for config in chosen:
            images = ensure_images(prefixed(IMAGES, config[0], NUM_IMAGES))
            result = run_one(config, images, args.profile_step, code_root=args.code_root,
                             max_rss_gb=args.max_rss_gb, force=args.force,
                             env_extra=SCORE_ENV if "-scores-" in config[0] else None)
            measured[config[0]] = result
            if os.path.isfile(RESULTS_JSON):  # keep the rows another bench/run.py wrote meanwhile
                with open(RESULTS_JSON) as f:
                    data["runs"] = json.load(f)["runs"]
            data["runs"].update(measured)
            if result.get("status") == "ok":
                print(f"[bench] {config[0]}: {result['s_per_step_median']:.3f} s/step, first step "
                      f"{result['first_step_s']:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB, "
                      f"loss {fmt(result['final_loss'], '.4f')}", flush=True)
            else:
                print(f"[bench] {config[0]}: {result['status']}: {result.get('error')}", flush=True)
            with atomic_path(RESULTS_JSON) as tmp:  # after every run: a long session keeps what it measured
                with open(tmp, "w") as f:
                    json.dump(data, f, indent=1)
    write_markdown(data)
    write_plot(data)
    update_readme(data["runs"])
    print(f"[bench] wrote {os.path.relpath(RESULTS_MD, ROOT)}, {os.path.relpath(RESULTS_PNG, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
