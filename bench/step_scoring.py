#!/usr/bin/env python
"""Which step is the good one? Do the trainer's step scores rank saved steps the way the shapes judge does?

    python bench/step_scoring.py                    # both held-out concepts x SEEDS
    python bench/step_scoring.py --seeds 1 --max_steps 100
    python bench/step_scoring.py --report           # only redraw bench/step_scoring.md

Each run trains one held-out concept of the shapes model (tests/assets/shapes-sd; tools/shapes.py DEV_CONCEPT
and MEASURED_CONCEPT) from five images with the documented recipe (tools/shapes.RECIPE) through
textual_inversion.py's command line, saving the embedding every SAVE_EVERY steps, with the validation loss
measured at every save on VALIDATION_IMAGES other fresh images of the concept (--validation_data_dir; the five
training images stay five). Every saved step is then:
  - judged: the fraction of 48 samples of "a photo of a <token>" the hand-written judge reads as the concept
    (`tools/shapes.py measure`, the numbers of the learning tests and bench/learning_curves.py);
  - scored by what the trainer wrote in eval.json: the validation loss (lower is better);
  - scored by `python -m textual_inversion_core.evaluate` with the shapes CLIP (tests/assets/shapes-clip):
    reconstruction and editability, written into the same eval.json.
The report gives, per concept, Spearman's rank correlation between each score and the judged rate over the
saved steps of each run (and over all runs' steps pooled), and how often the step --select_best's rule picks
(textual_inversion_core.best.choose, the code behind the flag) is within PICK_MARGIN of the best judged step's rate.

Results merge into bench/step_scoring.json by run; bench/step_scoring.md is redrawn from it. One CPU thread
per process (--jobs runs side by side).
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from textual_inversion_core.atomic import atomic_path  # noqa: E402
from tools import shapes  # noqa: E402

WORK = os.path.join(HERE, "pipelines", "step-scoring")  # git-ignored: images, run outputs, logs
RESULTS_JSON = os.path.join(HERE, "step_scoring.json")
RESULTS_MD = os.path.join(HERE, "step_scoring.md")
ASSET = os.path.join(ROOT, "tests", "assets", "shapes-sd")
# The CLIP scores' model, pictures per prompt and sampler steps: make demo's (tools/shapes.SCORING_FLAGS).
CLIP = shapes.SCORING_CLIP
EVAL_SAMPLES = shapes.SCORING_FLAGS["eval_num_samples"]
EVAL_STEPS = shapes.SCORING_FLAGS["eval_inference_steps"]
TORCH_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
TRAINER = os.path.join(ROOT, "textual_inversion.py")
CONCEPTS = {"dev": shapes.DEV_CONCEPT, "measured": shapes.MEASURED_CONCEPT}
TOKEN = "<my-shape>"
SEEDS = (1, 2, 3)
MAX_STEPS = 200
SAVE_EVERY = 25
VALIDATION_IMAGES = shapes.VALIDATION_IMAGES
VALIDATION_IMAGE_SEED = shapes.VALIDATION_IMAGE_SEED
# A pick is good when its judged rate is at most this far below the best saved step's: 0.1 of 48 samples is
# about 5 samples, near the binomial noise of a 48-sample rate at 50 % (+-0.07).
PICK_MARGIN = 0.1
# score name -> (eval.json key, True if higher is better)
SCORES = {"validation loss": ("validation_loss", False), "reconstruction": ("reconstruction", True),
          "editability": ("editability", True)}
# --select_best rule -> the score it is reported under
RULES = {"validation_loss": "validation loss", "reconstruction": "reconstruction", "balanced": "reconstruction"}
LAST = "last"  # no selection: the final step, the baseline a rule has to beat


def run_name(concept, seed):
    return f"{concept}/seed{seed}"


def one_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def train_command(data_dir, validation_dir, out_dir, seed, max_steps):
    options = dict(shapes.RECIPE, pretrained_model_name_or_path=ASSET, train_data_dir=data_dir, output_dir=out_dir,
                   placeholder_token=TOKEN, max_train_steps=max_steps, save_steps=SAVE_EVERY, seed=seed,
                   checkpointing_steps=0, report_to="none", export_formats="diffusers",
                   validation_data_dir=validation_dir)
    return [TORCH_PYTHON, TRAINER] + [f"--{key}={value}" for key, value in options.items()]


def train_and_measure(concept, seed, max_steps):
    name = run_name(concept, seed)
    result = {"concept": concept, "seed": seed, "max_steps": max_steps}
    data_dir = shapes.write_concept_images(os.path.join(WORK, "images", concept), CONCEPTS[concept])
    validation_dir = shapes.write_concept_images(os.path.join(WORK, "validation-images", concept), CONCEPTS[concept],
                                                 count=VALIDATION_IMAGES, seed=VALIDATION_IMAGE_SEED)
    out_dir = os.path.join(WORK, "runs", name.replace("/", "-"))
    log_path = os.path.join(WORK, "logs", name.replace("/", "-") + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"[scoring] {name}: training", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(train_command(data_dir, validation_dir, out_dir, seed, max_steps), cwd=ROOT,
                              env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT)
    result["train_wall_s"] = round(time.time() - started, 1)
    steps = list(range(SAVE_EVERY, max_steps + 1, SAVE_EVERY))
    files = [os.path.join(out_dir, f"learned_embeds-steps-{step}.safetensors") for step in steps]
    missing = [f for f in files if not os.path.isfile(f)]
    if proc.returncode != 0 or missing:
        with open(log_path, errors="replace") as f:
            tail = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-3:]
        result.update(status="failed", error=" | ".join(tail)[-400:], log=os.path.relpath(log_path, ROOT))
        return result
    print(f"[scoring] {name}: judging {len(files)} saved steps", flush=True)
    started = time.time()
    measured = subprocess.run([TORCH_PYTHON, os.path.join(ROOT, "tools", "shapes.py"), "measure", "--pipeline", ASSET,
                               "--token", TOKEN, "--concept", " ".join(CONCEPTS[concept]), *files],
                              cwd=ROOT, env=one_thread_env(), capture_output=True, text=True)
    if measured.returncode != 0:
        result.update(status="failed", error="measure: " + measured.stderr.strip()[-400:])
        return result
    judged = json.loads(measured.stdout.strip().splitlines()[-1])
    result.update(
        status="ok", steps=steps,
        rate=[round(judged[f]["rate_token"], 4) for f in files],
        concept_loss=[round(judged[f]["loss_token"], 6) for f in files],
        rate_initializer=round(judged[files[0]]["rate_initializer"], 4),
        judge_wall_s=round(time.time() - started, 1),
        measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        log=os.path.relpath(log_path, ROOT))
    return score(result, concept, out_dir, data_dir)


def score(result, concept, out_dir, data_dir):
    """Add the CLIP scores (evaluate command; steps already in eval.json keep theirs) and every score of eval.json."""
    print(f"[scoring] {run_name(concept, result['seed'])}: CLIP scores", flush=True)
    started = time.time()
    command = [TORCH_PYTHON, "-m", "textual_inversion_core.evaluate", out_dir, "--eval_clip_model", CLIP,
               "--pretrained_model_name_or_path", ASSET, "--train_data_dir", data_dir,
               "--initializer_token", shapes.RECIPE["initializer_token"], "--resolution", str(shapes.RECIPE["resolution"]),
               "--eval_num_samples", str(EVAL_SAMPLES), "--eval_inference_steps", str(EVAL_STEPS)]
    proc = subprocess.run(command, cwd=ROOT, env=one_thread_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        result.update(status="failed", error="evaluate: " + proc.stderr.strip()[-400:])
        return result
    result["score_wall_s"] = round(time.time() - started, 1)
    with open(os.path.join(out_dir, "eval.json")) as f:
        recorded = json.load(f)
    steps = result["steps"]
    for key, _ in SCORES.values():
        result[key] = [recorded["steps"].get(str(step), {}).get(key) for step in steps]
    result["validation_baseline"] = recorded["steps"].get(str(steps[0]), {}).get("validation_baseline")
    result["initializer_scores"] = recorded.get("initializer")
    from textual_inversion_core import best

    entries = {int(k): v for k, v in recorded["steps"].items() if int(k) in steps}
    result["picks"] = {rule: best.choose(entries, rule, recorded.get("initializer"))[0] for rule in RULES}
    return result


# --------------------------------------------------------------------------------------------------
# Statistics


def ranks(values):
    """Ranks from 1, ties given their mean rank (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        out[tied] = out[tied].mean()
    return out


def spearman(a, b):
    """Spearman's rank correlation of two equally long sequences; None if either is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def oriented(run, score):
    """The run's values of a score, signed so that higher means better (None if any step lacks it)."""
    key, higher_is_better = SCORES[score]
    values = run.get(key)
    if not values or any(v is None for v in values):
        return None
    return [v if higher_is_better else -v for v in values]


def pick(run, rule):
    """(step --select_best rule picked, judged rate there, best judged rate of the run's saved steps)."""
    step = run["steps"][-1] if rule == LAST else run["picks"][rule]
    return step, run["rate"][run["steps"].index(step)], max(run["rate"])


def summary(runs):
    """{concept: {score: {"per_run": [rho], "pooled": rho, "seeds": [...]}, rule: {"picks": [...],
    "picks_within_margin": k, "runs": n}}}."""
    out = {}
    for concept in CONCEPTS:
        chosen = [r for r in runs.values() if r.get("status") == "ok" and r["concept"] == concept]
        if not chosen:
            continue
        out[concept] = {}
        for score in SCORES:
            usable = [r for r in chosen if oriented(r, score) is not None]
            if not usable:
                continue
            per_run = [spearman(oriented(r, score), r["rate"]) for r in usable]
            pooled = spearman([v for r in usable for v in oriented(r, score)], [v for r in usable for v in r["rate"]])
            out[concept][score] = {"per_run": [None if v is None else round(v, 3) for v in per_run],
                                   "pooled": None if pooled is None else round(pooled, 3),
                                   "seeds": [r["seed"] for r in usable]}
        for rule in list(RULES) + [LAST]:
            usable = [r for r in chosen if rule == LAST or rule in r.get("picks", {})]
            if not usable:
                continue
            picks = [pick(r, rule) for r in usable]
            out[concept][f"--select_best {rule}" if rule != LAST else "no selection: the last step"] = {
                "picks": [{"seed": r["seed"], "step": s, "rate": rate, "best_rate": best}
                          for r, (s, rate, best) in zip(usable, picks)],
                "picks_within_margin": sum(best - rate <= PICK_MARGIN + 1e-9 for _, rate, best in picks),
                "runs": len(usable)}
    return out


def fmt(value):
    return "–" if value is None else f"{value:+.2f}"


def write_markdown(data):
    runs = data["runs"]
    stats = summary(runs)
    out = ["# Step scores against the shapes judge", "",
           "Generated by `bench/step_scoring.py` from `bench/step_scoring.json`; do not edit by hand. Each run trains "
           "one held-out concept of `tests/assets/shapes-sd` from 5 images with the recipe "
           f"(`tools/shapes.RECIPE`), saving every {SAVE_EVERY} steps, one CPU thread; the validation loss is measured "
           f"by the trainer on {VALIDATION_IMAGES} other fresh images of the concept (`--validation_data_dir`). The "
           f"judged rate is the fraction of {shapes.GENERATED} samples of \"a photo of a {TOKEN}\" the judge "
           "(`tools/shapes.py`) reads as the concept.", "",
           f"Spearman's rank correlation between each score (signed so that higher is better) and the judged rate "
           f"over a run's saved steps, each seed's, then over all seeds' steps pooled. CLIP scores: "
           f"`python -m textual_inversion_core.evaluate` with `tests/assets/shapes-clip`, {EVAL_SAMPLES} pictures per "
           f"prompt, {EVAL_STEPS} sampler steps.", "",
           "| concept | score | Spearman per seed | pooled |", "|---|---|---|---:|"]
    for concept, scores in stats.items():
        for score, s in scores.items():
            if "per_run" in s:
                per_run = ", ".join(f"{fmt(v)} (seed {seed})" for v, seed in zip(s["per_run"], s["seeds"]))
                out.append(f"| {' '.join(CONCEPTS[concept])} | {score} | {per_run} | {fmt(s['pooled'])} |")
    out += ["", f"The step `--select_best` picks (its rule over eval.json, `textual_inversion_core/best.py`), its judged "
            f"rate and the best saved step's; a pick is good when it is at most {PICK_MARGIN} below the best (the last "
            "row: keeping the final step, the baseline a rule has to beat):", "",
            "| concept | rule | picks: step (rate / best rate) per seed | good picks |", "|---|---|---|---:|"]
    for concept, scores in stats.items():
        for rule, s in scores.items():
            if "picks" in s:
                picks = ", ".join(f"{p['step']} ({p['rate']:.2f} / {p['best_rate']:.2f}, seed {p['seed']})"
                                  for p in s["picks"])
                out.append(f"| {' '.join(CONCEPTS[concept])} | `{rule}` | {picks} | {s['picks_within_margin']}/{s['runs']} |")
    for name, run in sorted(runs.items()):
        if run.get("status") != "ok":
            out += ["", f"**{name}**: {run.get('status')}: {run.get('error')}"]
            continue
        out += ["", f"**{' '.join(CONCEPTS[run['concept']])}, seed {run['seed']}** (initializer judged "
                f"{run['rate_initializer']:.2f}; validation baseline {run.get('validation_baseline')})", "",
                "| step | " + " | ".join(map(str, run["steps"])) + " |", "|---|" + "---:|" * len(run["steps"]),
                "| judged rate | " + " | ".join(f"{v:.2f}" for v in run["rate"]) + " |"]
        for score_name, (key, _) in SCORES.items():
            if run.get(key) and all(v is not None for v in run[key]):
                out.append(f"| {score_name} | " + " | ".join(f"{v:.5f}" for v in run[key]) + " |")
    with atomic_path(RESULTS_MD) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(out) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Step scores against the shapes judge.")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--concepts", nargs="+", choices=list(CONCEPTS), default=list(CONCEPTS))
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS)
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one CPU thread each")
    parser.add_argument("--report", action="store_true", help="only redraw the report")
    parser.add_argument("--score_only", action="store_true",
                        help="only (re)score runs already trained and judged (CLIP scores, eval.json's numbers)")
    args = parser.parse_args(argv)

    data = {"runs": {}}
    if os.path.isfile(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            data = json.load(f)
    if not args.report:
        lock = threading.Lock()

        def one(concept_seed):
            concept, seed = concept_seed
            name = run_name(concept, seed)
            if args.score_only:
                if data["runs"].get(name, {}).get("status") != "ok":
                    return
                run = data["runs"][name]
                out_dir = os.path.join(WORK, "runs", name.replace("/", "-"))
                result = score(dict(run), concept, out_dir, os.path.join(WORK, "images", concept))
            else:
                result = train_and_measure(concept, seed, args.max_steps)
            with lock:
                data["runs"][run_name(concept, seed)] = result
                print(f"[scoring] {run_name(concept, seed)}: {result['status']} {result.get('rate', result.get('error'))}",
                      flush=True)
                with atomic_path(RESULTS_JSON) as tmp:
                    with open(tmp, "w") as f:
                        json.dump(data, f, indent=1)

        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, [(c, s) for c in args.concepts for s in args.seeds]))
    write_markdown(data)
    print(f"[scoring] wrote {os.path.relpath(RESULTS_MD, ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
