#!/usr/bin/env python
"""Learning curves on the pretrained shapes model: how soon each trainer learns a held-out concept.

    python bench/learning_curves.py                       # every setting x trainer x concept x seed
    python bench/learning_curves.py --only torch --seeds 1
    python bench/learning_curves.py --report              # only redraw the tables and the plot

Each run trains one concept the base model never saw (tests/assets/shapes-sd; tools/shapes.py
DEV_CONCEPT, the one recipes are tuned on, and MEASURED_CONCEPT, only ever measured) from five images
with the documented recipe (tools/shapes.RECIPE) plus the setting's flags, through the trainer's own
command line, saving the embedding every SAVE_EVERY steps. Every saved embedding in MEASURE_AT is then
measured in the PyTorch environment (`tools/shapes.py measure`, the code the learning tests use):
the concept loss of "a photo of a <token>" against "a photo of a shape" on the same fresh images,
noise and timesteps, and the fraction of 48 samples the judge reads as the concept. The headline is
the number of steps until that fraction first reaches TARGET_RATE.

Results merge into bench/learning_results.json by run (a partial rerun keeps the other runs); then
bench/learning_results.md, bench/learning_curves.png and the README block between the markers below
are redrawn from it. A training control is one more SETTINGS entry: its flags are appended to the
recipe's, and it gets its own rows in every table and its own lines in the plot.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.readme_block import replace_block  # noqa: E402
from textual_inversion_core.atomic import atomic_path  # noqa: E402
from tools import shapes  # noqa: E402

WORK = os.path.join(HERE, "pipelines", "learning")  # git-ignored: images, run outputs, logs, XLA cache
RESULTS_JSON = os.path.join(HERE, "learning_results.json")
RESULTS_MD = os.path.join(HERE, "learning_results.md")
RESULTS_PNG = os.path.join(HERE, "learning_curves.png")
README_MD = os.path.join(ROOT, "README.md")
README_BEGIN = "<!-- learning curves: begin (written by bench/learning_curves.py) -->"
README_END = "<!-- learning curves: end -->"
ASSET = os.path.join(ROOT, "tests", "assets", "shapes-sd")
FLOW_ASSET = os.path.join(ROOT, "tests", "assets", "shapes-sd3")
TORCH_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
FLAX_PYTHON = os.path.join(ROOT, ".venv-flax", "bin", "python")
TRAINERS = {
    "torch": (TORCH_PYTHON, os.path.join(ROOT, "textual_inversion.py")),
    "flax": (FLAX_PYTHON, os.path.join(ROOT, "textual_inversion_flax.py")),
}
TRAINER_LABEL = {"torch": "textual_inversion.py", "flax": "textual_inversion_flax.py"}
CONCEPTS = {"dev": shapes.DEV_CONCEPT, "measured": shapes.MEASURED_CONCEPT}
TOKEN = "<my-shape>"

# Setting name -> trainer flags added to the recipe. "default" is the recipe as documented and runs in
# both trainers with every seed; the training controls (README "Training controls") run in the PyTorch
# trainer with CONTROL_SEEDS (the Flax trainer computes the same objective: tests/flax/test_flax_parity.py,
# tests/flax/test_flax_training_controls.py), to keep `make bench` near an hour on 2 cores.
SETTINGS = {
    "default": [],
    "snr-gamma-5": ["--snr_gamma=5"],
    "noise-offset-0.05": ["--noise_offset=0.05"],
    "timesteps-200-1000": ["--min_timestep=200"],
    "preserve-norm": ["--preserve_embedding_norm"],
    # 0.75: about the norm of the colour and shape words in this model's vocabulary (0.62-0.76); unchecked,
    # the learned vector passes 1.1 within 200 steps.
    "norm-cap-0.75": ["--max_embedding_norm=0.75"],
    "lr-0.02": ["--learning_rate=0.02"],
    # The candidate fast recipe: the two settings that moved the development concept earliest, together.
    "lr-0.02+timesteps-200-1000": ["--learning_rate=0.02", "--min_timestep=200"],
}
# On the flow (SD3) shapes model, tests/assets/shapes-sd3, with shapes.FLOW_RECIPE, PyTorch only (the Flax trainer has
# no SD3): the token in the CLIP encoders only, and in T5 too. The pair of rows answers "what is T5 worth".
FLOW_SETTINGS = {
    "sd3": [],
    "sd3+t5": ["--enable_t5_ti"],
}
SETTINGS.update(FLOW_SETTINGS)
FAST_RECIPE = "lr-0.02+timesteps-200-1000"  # README "Fast recipe"
SEEDS = (1, 2, 3)
CONTROL_SEEDS = (1, 2)


def planned_runs(seeds=None):
    """(setting, trainer, concept, seed) of every run, in SETTINGS order; seeds: the first N seeds of each."""
    out = []
    for setting in SETTINGS:
        trainers, chosen = (TRAINERS, SEEDS) if setting == "default" else (("torch",), CONTROL_SEEDS)
        if setting == FAST_RECIPE or setting in FLOW_SETTINGS:  # the recommendation and the flow rows: every seed
            chosen = SEEDS
        for trainer in trainers:
            for concept in CONCEPTS:
                out += [(setting, trainer, concept, seed) for seed in chosen[:seeds]]
    return out
MAX_STEPS = 400
SAVE_EVERY = 25
MEASURE_AT = (25, 50, 75, 100, 150, 200, 300, 400)
# 40 %: the development concept's words reach 44 % of 48 samples on this model ("a photo of a purple star"), and
# its learned token plateaus at 42-52 %; 50 % would be reached by some seeds and never by others.
TARGET_RATE = 0.4
# A fast recipe must reach, by this step (at most a third of MAX_STEPS), the default recipe's rate at MAX_STEPS.
EARLY_STEP = 100


def run_name(setting, trainer, concept, seed):
    return f"{setting}/{trainer}/{concept}/seed{seed}"


def model_of(setting):
    """(pipeline folder, recipe) a setting trains with: the flow model for FLOW_SETTINGS, else the SD one."""
    return (FLOW_ASSET, shapes.FLOW_RECIPE) if setting in FLOW_SETTINGS else (ASSET, shapes.RECIPE)


def trainer_command(trainer, data_dir, out_dir, seed, setting):
    python, script = TRAINERS[trainer]
    asset, recipe = model_of(setting)
    options = dict(recipe, pretrained_model_name_or_path=asset, train_data_dir=data_dir, output_dir=out_dir,
                   placeholder_token=TOKEN, max_train_steps=MAX_STEPS, save_steps=SAVE_EVERY, seed=seed,
                   checkpointing_steps=0, report_to="none", export_formats="diffusers")
    return [python, script] + [f"--{key}={value}" for key, value in options.items()] + list(SETTINGS[setting])


def one_thread_env(trainer):
    """One CPU thread per process: the machine is shared, and these kernels are too small to split."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if trainer == "flax":
        env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(WORK, "xla-cache"),
                   XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                             "intra_op_parallelism_threads=1")
    return env


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_child(command, stdout, stderr, **popen):
    """(exit code, CPU seconds of that child alone): os.wait4 reads the child's own rusage (the process-wide
    children's times, os.times, would also count the runs other --jobs threads reaped meanwhile)."""
    child = subprocess.Popen(command, stdout=stdout, stderr=stderr, **popen)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return child.returncode, usage.ru_utime + usage.ru_stime


def train_and_measure(setting, trainer, concept, seed):
    name = run_name(setting, trainer, concept, seed)
    python, script = TRAINERS[trainer]
    result = {"setting": setting, "trainer": trainer, "concept": concept, "seed": seed,
              "flags": SETTINGS[setting], "loadavg_start": loadavg()}
    if not os.path.isfile(python):
        result.update(status="missing", error=f"{os.path.relpath(python, ROOT)} does not exist (make setup / setup-flax)")
        return result
    data_dir = shapes.write_concept_images(os.path.join(WORK, "images", concept), CONCEPTS[concept])
    out_dir = os.path.join(WORK, "runs", name.replace("/", "-"))
    log_path = os.path.join(WORK, "logs", name.replace("/", "-") + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    command = trainer_command(trainer, data_dir, out_dir, seed, setting)
    print(f"[learning] {name}: training ({loadavg()})", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        returncode, cpu_s = run_child(command, log, subprocess.STDOUT, cwd=ROOT, env=one_thread_env(trainer))
    result.update(train_wall_s=round(time.time() - started, 1), train_cpu_s=round(cpu_s, 1), cpu_timing="child")
    files = [os.path.join(out_dir, f"learned_embeds-steps-{step}.safetensors") for step in MEASURE_AT]
    missing = [f for f in files if not os.path.isfile(f)]
    if returncode != 0 or missing:
        with open(log_path, errors="replace") as f:
            tail = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-3:]
        result.update(status="failed", error=" | ".join(tail)[-400:], log=os.path.relpath(log_path, ROOT))
        return result
    print(f"[learning] {name}: measuring {len(files)} embeddings", flush=True)
    started = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        returncode, measure_cpu_s = run_child(
            [TORCH_PYTHON, os.path.join(ROOT, "tools", "shapes.py"), "measure", "--pipeline", model_of(setting)[0],
             "--token", TOKEN, "--concept", " ".join(CONCEPTS[concept]), *files],
            out, err, cwd=ROOT, env=one_thread_env("torch"))
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if returncode != 0:
        result.update(status="failed", error="measure: " + stderr.strip()[-400:])
        return result
    numbers = json.loads(stdout.strip().splitlines()[-1])
    rows = [numbers[f] for f in files]
    result.update(
        status="ok", steps=list(MEASURE_AT),
        rate_token=[round(r["rate_token"], 4) for r in rows], loss_token=[round(r["loss_token"], 6) for r in rows],
        rate_initializer=round(rows[0]["rate_initializer"], 4), loss_initializer=round(rows[0]["loss_initializer"], 6),
        measure_wall_s=round(time.time() - started, 1), measure_cpu_s=round(measure_cpu_s, 1),
        loadavg_end=loadavg(), measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        log=os.path.relpath(log_path, ROOT))
    return result


# --------------------------------------------------------------------------------------------------
# Reports


def steps_to_rate(run, target=TARGET_RATE):
    """The first measured step whose judged rate is at least target, or None if none is."""
    return next((s for s, r in zip(run["steps"], run["rate_token"]) if r >= target), None)


def groups(runs):
    """{(setting, trainer, concept): [ok runs, by seed]} in SETTINGS / TRAINERS / CONCEPTS order."""
    out = {}
    for setting in list(SETTINGS) + sorted({r["setting"] for r in runs.values()} - set(SETTINGS)):
        for trainer in TRAINERS:
            for concept in CONCEPTS:
                chosen = sorted((r for r in runs.values() if r.get("status") == "ok" and r["setting"] == setting
                                 and r["trainer"] == trainer and r["concept"] == concept), key=lambda r: r["seed"])
                if chosen:
                    out[(setting, trainer, concept)] = chosen
    return out


def steps_cell(group):
    """'75 (50, 75, 100)': median over seeds (of two: their mean) of the steps to TARGET_RATE, then each
    seed's ('>400': never)."""
    values = [steps_to_rate(r) for r in group]
    shown = [str(v) if v is not None else f">{r['steps'][-1]}" for v, r in zip(values, group)]
    if sum(v is None for v in values) * 2 >= len(values):
        median = f">{group[0]['steps'][-1]}"
    else:
        # Unreached seeds count as larger than any measured step.
        median = f"{statistics.median([v if v is not None else float('inf') for v in values]):.0f}"
    return f"**{median}** ({', '.join(shown)})" if len(values) > 1 else f"**{shown[0]}**"


def concept_label(key):
    return f"{' '.join(CONCEPTS[key])} ({'tuned on' if key == 'dev' else 'measured only'})"


def headline_lines(runs):
    grouped = groups(runs)
    rows = list(dict.fromkeys(key[:2] for key in grouped))
    out = [f"Steps until the judged rate of the token's samples first reaches {TARGET_RATE:.0%} (median over seeds, "
           "of two seeds their mean; "
           "each seed in brackets; measured at steps " + ", ".join(map(str, MEASURE_AT)) + f"), then the seeds' mean "
           f"judged rate after {EARLY_STEP} and after {MAX_STEPS} steps:", "",
           "| setting | trainer | " + " | ".join(concept_label(c) for c in CONCEPTS) + " | "
           + " | ".join(f"{' '.join(CONCEPTS[c])}: rate at {EARLY_STEP} / {MAX_STEPS}" for c in CONCEPTS) + " |",
           "|---|---|" + "---|" * len(CONCEPTS) + "---:|" * len(CONCEPTS)]
    for setting, trainer in rows:
        cells = [steps_cell(grouped[(setting, trainer, c)]) if (setting, trainer, c) in grouped else "–"
                 for c in CONCEPTS]
        cells += [rate_cell(grouped[(setting, trainer, c)]) if (setting, trainer, c) in grouped else "–"
                  for c in CONCEPTS]
        flags = " ".join(SETTINGS.get(setting, [])) or "recipe"
        if setting in FLOW_SETTINGS:
            flags = " ".join([f"shapes-sd3 --max_sequence_length={shapes.FLOW_MAX_SEQUENCE_LENGTH}"] + SETTINGS[setting])
        out.append(f"| {setting} (`{flags}`) | {TRAINER_LABEL[trainer]} | " + " | ".join(cells) + " |")
    return out


def rate_cell(group):
    """'0.45 / 0.98': the seeds' mean judged rate at EARLY_STEP and at the last step."""
    at = group[0]["steps"].index(EARLY_STEP)
    return f"{mean([r['rate_token'][at] for r in group]):.2f} / {mean([r['rate_token'][-1] for r in group]):.2f}"


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def curve_lines(runs):
    """Per group: the seeds' mean judged rate and loss margin at each measured step."""
    out = []
    for (setting, trainer, concept), group in groups(runs).items():
        steps = group[0]["steps"]
        out += ["", f"**{setting}, {TRAINER_LABEL[trainer]}, {concept_label(concept)}** — {len(group)} seeds "
                f"({', '.join(str(r['seed']) for r in group)}); the initializer \"{shapes.GENERIC_WORD}\" is judged the "
                f"concept in {mean([r['rate_initializer'] for r in group]):.2f} of its samples", "",
                "| step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]
        rates = [mean([r["rate_token"][i] for r in group]) for i in range(len(steps))]
        spread = [(min(r["rate_token"][i] for r in group), max(r["rate_token"][i] for r in group))
                  for i in range(len(steps))]
        margins = [mean([r["loss_initializer"] - r["loss_token"][i] for r in group]) for i in range(len(steps))]
        out.append("| judged rate, mean (min–max) | " + " | ".join(f"{m:.2f} ({lo:.2f}–{hi:.2f})" for m, (lo, hi)
                                                               in zip(rates, spread)) + " |")
        out.append("| loss margin, initializer − token | " + " | ".join(f"{m:.4f}" for m in margins) + " |")
        # Only runs timed by their own rusage (cpu_timing "child"): before, --jobs 2 mixed in the other thread's runs.
        timed = [r["train_cpu_s"] for r in group if r.get("cpu_timing") == "child"]
        cpu = f"{mean(timed):.0f} ({len(timed)} of {len(group)} runs)" if timed else "– (not timed alone)"
        out.append(f"| train CPU s per run ({MAX_STEPS} steps) | {cpu} |" + " |" * (len(steps) - 1))
    return out


def write_markdown(data):
    runs = data["runs"]
    out = ["# Learning curves on the shapes model", "",
           "Generated by `bench/learning_curves.py` (part of `make bench`) from `bench/learning_results.json`; do "
           "not edit by hand. Each run trains one held-out concept of `tests/assets/shapes-sd` from 5 images with "
           f"the recipe `{recipe_flags()}` plus the setting's flags, for {MAX_STEPS} steps, one CPU thread; each "
           f"saved embedding is measured by `tools/shapes.py measure`: the judged rate is the fraction of "
           f"{shapes.GENERATED} samples (DDIM 20 steps, guidance 4, the same seeds for every row) the judge reads as "
           "the concept; the loss margin is the initializer prompt's concept loss minus the token prompt's, on the "
           "same 48 fresh images, noise and timesteps. The sd3 rows train on the flow-matching shapes model "
           "`tests/assets/shapes-sd3` instead (its own Euler sampler, 20 steps, guidance 4; the loss is the velocity "
           "MSE), PyTorch only.", ""]
    out += headline_lines(runs) + curve_lines(runs)
    out += ["", "![judged rate and loss margin against training steps](learning_curves.png)", ""]
    with atomic_path(RESULTS_MD) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(out))


def recipe_flags():
    return " ".join(f"--{k}={v}" for k, v in shapes.RECIPE.items())


def update_readme(runs):
    replace_block(README_MD, README_BEGIN, README_END, headline_lines(runs), "learning")


COLOURS = {"torch": (31, 119, 180), "flax": (44, 160, 44)}
# The default recipe is drawn in its trainer's colour; each training control (PyTorch) in a hue of its own.
SETTING_COLOURS = ((255, 127, 14), (0, 0, 0), (148, 103, 189), (140, 86, 75), (227, 119, 194),
                   (127, 127, 127), (188, 189, 34), (23, 190, 207), (214, 39, 40), (0, 0, 128))


def line_colour(trainer, setting_index):
    if setting_index == 0:
        return COLOURS[trainer]
    return SETTING_COLOURS[(setting_index - 1) % len(SETTING_COLOURS)]


def write_plot(data):
    """Per concept: judged rate, and loss margin on each model (the SD model's DDPM loss and the flow model's
    velocity loss differ ~60x in scale, so each has its own panel), against steps; one line per trainer x setting
    (the seeds' mean), a dot per seed and step. Drawn with Pillow (no plotting library in the environments)."""
    from PIL import Image, ImageDraw, ImageFont

    grouped = groups(data["runs"])
    font = ImageFont.load_default()
    panel_w, panel_h, left, top, gap = 360, 220, 60, 40, 90
    concepts = [c for c in CONCEPTS if any(k[2] == c for k in grouped)]
    settings = list(dict.fromkeys(k[0] for k in grouped))
    def shown(setting, flow):
        """Does a panel for flow (None: either model; False: shapes-sd; True: shapes-sd3) draw this setting?"""
        return flow is None or (setting in FLOW_SETTINGS) == flow

    def margin_range(flow):
        margins = [r["loss_initializer"] - v for k, g in grouped.items() if shown(k[0], flow)
                   for r in g for v in r["loss_token"]]
        return min([0.0] + margins), max([0.001] + margins) * 1.1

    panels = [("judged {} rate", 0.0, 1.0, None),
              ("loss margin, shapes-sd (initializer - token)", *margin_range(False), False)]
    if any(k[0] in FLOW_SETTINGS for k in grouped):
        panels.append(("loss margin, shapes-sd3 (velocity loss)", *margin_range(True), True))
    width = left + len(panels) * (panel_w + gap) + 10
    height = top + len(concepts) * (panel_h + 70) + 20 + 14 * len(settings) * len(TRAINERS)
    image = Image.new("RGB", (width, max(height, 200)), "white")
    draw = ImageDraw.Draw(image)
    max_step = max([MAX_STEPS] + [r["steps"][-1] for g in grouped.values() for r in g])
    for row, concept in enumerate(concepts):
        y0 = top + row * (panel_h + 70)
        for col, (label, low, high, flow) in enumerate(panels):
            label = label.format(" ".join(CONCEPTS[concept]))
            x0 = left + col * (panel_w + gap)
            draw.text((x0, y0 - 16), f"{concept_label(concept)}: {label}", fill="black", font=font)

            def px(step, value, x0=x0, y0=y0, low=low, high=high):
                return (x0 + step / max_step * panel_w, y0 + (high - value) / (high - low) * panel_h)

            ticks = (0, 0.25, 0.5, 0.75, 1.0) if col == 0 else [low + (high - low) * k / 4 for k in range(5)]
            for tick in ticks:
                _, ty = px(0, tick)
                draw.line([x0, ty, x0 + panel_w, ty], fill=(232, 232, 232))
                draw.text((x0 - 55, ty - 6), f"{tick:.2f}" if col == 0 else f"{tick:.4f}", fill="black", font=font)
            for step in range(0, max_step + 1, 100):
                tx, _ = px(step, low)
                draw.text((tx - 8, y0 + panel_h + 4), str(step), fill="black", font=font)
            draw.rectangle([x0, y0, x0 + panel_w, y0 + panel_h], outline="black")
            if col == 0:
                _, ty = px(0, TARGET_RATE)
                draw.line([x0, ty, x0 + panel_w, ty], fill=(200, 60, 60))
            for (setting, trainer, c), group in grouped.items():
                if c != concept or not shown(setting, flow):
                    continue
                colour = line_colour(trainer, settings.index(setting))
                steps = [0] + group[0]["steps"]
                per_seed = [[r["rate_initializer"]] + r["rate_token"] if col == 0 else
                            [0.0] + [r["loss_initializer"] - v for v in r["loss_token"]] for r in group]
                for values in per_seed:
                    for s, v in zip(steps, values):
                        x, y = px(s, v)
                        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
                means = [mean([values[i] for values in per_seed]) for i in range(len(steps))]
                draw.line([px(s, v) for s, v in zip(steps, means)], fill=colour, width=2)
        draw.text((left + panel_w - 20, y0 + panel_h + 18), "training steps", fill="black", font=font)
    y = top + len(concepts) * (panel_h + 70)
    for setting in settings:
        for trainer in TRAINERS:
            if any(k[:2] == (setting, trainer) for k in grouped):
                draw.line([left, y + 6, left + 30, y + 6], fill=line_colour(trainer, settings.index(setting)), width=2)
                draw.text((left + 36, y), f"{TRAINER_LABEL[trainer]}, {setting}: mean over seeds (dots: each seed); "
                          f"red line: {TARGET_RATE:.0%}", fill="black", font=font)
                y += 14
    with atomic_path(RESULTS_PNG) as tmp:
        image.save(tmp, format="PNG")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Learning curves of the trainers on the shapes model.")
    parser.add_argument("--only", action="append", default=[],
                        help="run only runs whose name (setting/trainer/concept/seedN) contains this (repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="skip runs whose name contains this")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"use the first N seeds of each setting (default: {SEEDS} for default, {CONTROL_SEEDS} "
                             "for the controls)")
    parser.add_argument("--report", action="store_true", help="only redraw the tables and the plot")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                        help="runs side by side, one CPU thread each (default: one per core)")
    args = parser.parse_args(argv)

    data = {"runs": {}}
    if os.path.isfile(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            data = json.load(f)
    if not args.report:
        names = planned_runs(args.seeds)
        chosen = [n for n in names if (not args.only or any(o in run_name(*n) for o in args.only))
                  and not any(o in run_name(*n) for o in args.skip)]
        lock = threading.Lock()

        def one(n):
            result = train_and_measure(*n)
            with lock:
                data["runs"][run_name(*n)] = result
                if result["status"] == "ok":
                    print(f"[learning] {run_name(*n)}: rates {result['rate_token']}, steps to {TARGET_RATE:.0%}: "
                          f"{steps_to_rate(result)}, train {result['train_cpu_s']:.0f} CPU s", flush=True)
                else:
                    print(f"[learning] {run_name(*n)}: {result['status']}: {result.get('error')}", flush=True)
                with atomic_path(RESULTS_JSON) as tmp:  # after every run: a long session keeps what it measured
                    with open(tmp, "w") as f:
                        json.dump(data, f, indent=1)

        # Every run is one thread; --jobs runs side by side (one per core). Results do not depend on it:
        # a run's numbers are fixed by its seed and thread count, not by what runs beside it.
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, chosen))
    write_markdown(data)
    write_plot(data)
    update_readme(data["runs"])
    print(f"[learning] wrote {os.path.relpath(RESULTS_MD, ROOT)}, {os.path.relpath(RESULTS_PNG, ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
