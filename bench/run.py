#!/usr/bin/env python
"""Benchmark the trainers: seconds per step, time to first step, peak memory, final loss.

    python bench/run.py                    # everything (tiny and sd15: ~60 min; the Flax sd15 rows peak at ~19 GB RAM)
    python bench/run.py --only tiny        # configurations whose name contains "tiny"
    python bench/run.py --report           # only redraw results.md / results.png from results.json

Each configuration runs in a fresh process (bench/step_timer.py wraps the script unchanged), with
the same flags for our trainer, the plain reference loop (bench/reference_loop.py) and the Flax
trainer. Pipelines with random weights are generated under bench/pipelines/ when missing.
Results are merged into bench/results.json by configuration name (so a partial rerun keeps the
other rows), then bench/results.md and bench/results.png are redrawn from it. /proc/loadavg is
recorded with every run: the machine may be shared, and load inflates every timing.
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
SCRIPTS = {
    "ours": os.path.join(ROOT, "textual_inversion.py"),
    "reference": os.path.join(HERE, "reference_loop.py"),
    "flax": os.path.join(ROOT, "textual_inversion_flax.py"),
}
TRAINER_LABEL = {"ours": "textual_inversion.py", "reference": "reference loop",
                 "flax": "textual_inversion_flax.py"}

# (name, trainer, pipeline, resolution, batch, extra flags, warm-up steps, measured steps)
# Two training images: our trainer's latent cache (one VAE encode per image and flip, 4 in all)
# is full by step 5 with --seed 0, so the measured steps are the steady state users pay for
# over thousands of steps; `encode_steps` in results.json lists the steps that encoded.
NUM_IMAGES = 2
TINY_STEPS = (5, 30)
SD15_STEPS = (5, 5)
# The reference loop has no cache to fill: a shorter warm-up measures the same steady state.
SD15_REFERENCE_STEPS = (2, 4)


def configurations():
    configs = []
    for batch in (1, 4):
        for trainer in ("ours", "reference", "flax"):
            configs.append((f"tiny-b{batch}-{trainer}", trainer, "tiny", 64, batch, [], *TINY_STEPS))
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
    return configs


# --------------------------------------------------------------------------------------------------
# Inputs


def ensure_pipeline(size):
    path = os.path.join(WORK, size)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        print(f"[bench] generating the {size} pipeline in {path} (random weights)", flush=True)
        subprocess.run([TORCH_PYTHON, os.path.join(ROOT, "tools", "make_tiny_pipeline.py"), path, "--size", size],
                       check=True)
    return path


def ensure_images(count=NUM_IMAGES, size=512):
    """A few deterministic synthetic photos (gradients and shapes); content does not affect speed."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = os.path.join(WORK, "images")
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


def run_one(config, images, profile_step=None):
    import psutil

    name, trainer, size, resolution, batch, extra, warmup, measured = config
    script = SCRIPTS[trainer]
    python = FLAX_PYTHON if trainer == "flax" else TORCH_PYTHON
    result = {"name": name, "trainer": trainer, "pipeline": size, "resolution": resolution, "batch": batch,
              "flags": extra, "warmup_steps": warmup, "measured_steps": measured}
    if not os.path.isfile(script):
        result.update(status="missing", error=f"{os.path.relpath(script, ROOT)} does not exist in this checkout")
        return result
    if not os.path.isfile(python):
        result.update(status="missing", error=f"{os.path.relpath(python, ROOT)} does not exist (make setup-flax)")
        return result
    out_dir = os.path.join(WORK, "runs", name)
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    timing_file = os.path.join(WORK, "logs", f"{name}.timing.json")
    log_file = os.path.join(WORK, "logs", f"{name}.log")
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
    result["loadavg_start"] = loadavg()
    load_samples = []
    peak_tree = 0
    print(f"[bench] {name}: {warmup}+{measured} steps (load {result['loadavg_start']})", flush=True)
    start = time.time()
    with open(log_file, "w") as log:
        child = subprocess.Popen([python, os.path.join(HERE, "step_timer.py"), timing_file, script] + flags,
                                 cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        next_load = start
        while child.poll() is None:
            peak_tree = max(peak_tree, tree_rss(watched))
            if time.time() >= next_load:
                load_samples.append(float(loadavg().split()[0]))
                next_load += 5.0
            time.sleep(0.1)
    wall = time.time() - start
    result.update(loadavg_end=loadavg(), loadavg_1min_mean=round(statistics.fmean(load_samples), 2),
                  wall_s=round(wall, 2), exit_code=child.returncode, log=os.path.relpath(log_file, ROOT),
                  measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    timing = {}
    if os.path.isfile(timing_file):
        with open(timing_file) as f:
            timing = json.load(f)
    ends = timing.get("step_end_times", [])
    if child.returncode != 0 or len(ends) < warmup + measured:
        with open(log_file, errors="replace") as f:
            tail = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-3:]
        result.update(status="failed", steps_done=len(ends), error=" | ".join(tail)[-400:])
        return result
    intervals = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
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
    if trainer == "ours":
        result["encode_steps"] = encode_steps(images, batch, warmup + measured)
    profile = os.path.splitext(timing_file)[0] + ".profile.txt"
    if os.path.isfile(profile):
        result["profile"] = os.path.relpath(profile, ROOT)
    return result


# --------------------------------------------------------------------------------------------------
# Reports


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
           "architecture, 512 px). s/step is the median over the measured steps after the warm-up steps; "
           "time to first step counts from process start (imports, model loading, first step); peak RSS "
           "is the OS high-water mark of the trainer process (and its children, sampled). Speed-up is the "
           "reference loop's s/step over this row's (the reference row of the same configuration, run next to it). "
           "Load average (1/5/15 min, /proc/loadavg) is recorded at the start of each run: on a shared "
           "machine a load above the core count inflates every number in that row.", "",
           f"Machine: {data.get('machine', {}).get('cpu', '?')}, {data.get('machine', {}).get('cores', '?')} cores, "
           f"torch threads = cores.", ""] + table_lines(results)
    out += ["", "![s/step and peak RSS per configuration](results.png)", ""]
    if os.path.isfile(NOTES_MD):
        with open(NOTES_MD) as f:
            out += [f.read().rstrip(), ""]
    with atomic_path(RESULTS_MD) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(out))


def table_lines(results):
    """The results table and the targets table (markdown lines), for results.md and the README."""
    order = [c[0] for c in configurations()]
    rows = [results[n] for n in order if n in results] + [r for n, r in results.items() if n not in order]
    out = ["| configuration | trainer | s/step (median) | steps/s | speed-up vs reference | time to first step (s) "
           "| peak RSS (GB) | final loss | steps (warm-up + measured) | load avg at start | measured at |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        label = r["name"].rsplit("-", 1)[0]
        trainer = TRAINER_LABEL.get(r["trainer"], r["trainer"])
        steps = f"{r['warmup_steps']} + {r['measured_steps']}"
        if r.get("status") != "ok":
            reason = r.get("status", "?") + ": " + str(r.get("error", "")).replace("|", "/")
            out.append(f"| {label} | {trainer} | – | – | – | – | – | – | {steps} | {r.get('loadavg_start', '–')} "
                       f"| {r.get('measured_at', '–')} ({reason}) |")
            continue
        ratio = speedup(results, r)
        out.append(f"| {label} | {trainer} | {r['s_per_step_median']:.3f} | {1 / r['s_per_step_median']:.2f} "
                   f"| {fmt(ratio, '.2f')}{'×' if ratio else ''} | {r['first_step_s']:.1f} | {r['peak_rss_gb']:.2f} "
                   f"| {fmt(r['final_loss'], '.4f')} | {steps} | {r['loadavg_start']} | {r['measured_at']} |")
    out += ["", "Targets of issue 6:", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, ok in targets(results):
        out.append(f"| {target} | {measured} | {'yes' if ok else '**no**'} |")
    return out


def update_readme(results):
    """Replace the tables between the README's bench markers, so the README quotes the latest results."""
    with open(README_MD) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        print(f"[bench] README.md has no {README_BEGIN} ... {README_END} block; not updated", flush=True)
        return
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with atomic_path(README_MD) as tmp:
        with open(tmp, "w") as f:
            f.write(head + README_BEGIN + "\n" + "\n".join(table_lines(results)) + "\n" + README_END + tail)


def write_plot(data):
    """Horizontal bars, s/step and peak RSS, one panel pair per pipeline size (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    results = data["runs"]
    order = [c[0] for c in configurations()]
    colours = {"ours": (31, 119, 180), "reference": (214, 39, 40), "flax": (44, 160, 44)}
    font = ImageFont.load_default()
    groups = [(size, [results[n] for n in order if n in results and results[n]["pipeline"] == size
                      and results[n].get("status") == "ok"]) for size in ("tiny", "sd15")]
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
    args = parser.parse_args(argv)

    data = {"runs": {}}
    if os.path.isfile(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            data = json.load(f)
    data["machine"] = machine_info()
    if not args.report:
        chosen = [c for c in configurations() if (not args.only or any(o in c[0] for o in args.only))
                  and not any(s in c[0] for s in args.skip)]
        images = ensure_images()
        for config in chosen:
            result = run_one(config, images, args.profile_step)
            data["runs"][config[0]] = result
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
