#!/usr/bin/env python
"""A/B timing of two checkouts of the trainers, interleaved in one session.

    git -C . archive fcf3694 | tar -x -C /tmp/ti-fcf3694      # the code before a change
    git -C . archive HEAD    | tar -x -C /tmp/ti-HEAD         # (or this checkout itself)
    python bench/ab_compare.py --arm old=/tmp/ti-fcf3694 --arm new=/tmp/ti-HEAD \\
        --arm "new-log1=/tmp/ti-HEAD:flax:--logging_steps 1" --only tiny-b1 --only tiny-b4 --runs 5

Each arm is NAME=ROOT[:TRAINERS[:EXTRA FLAGS]] (TRAINERS: comma-separated ours/reference/flax, or
empty for all). Every configuration of bench/run.py chosen by --only runs once per arm per round,
the arms' order rotating from round to round (A B C, B C A, ...), so slow drifts of the machine's
load fall on every arm alike. Each run is bench/run.py's run_one (a fresh process under
bench/step_timer.py, the same flags, pipelines and images, load average recorded). Raw rows go to
--out (JSON, rewritten after every run); the summary (median over rounds of each run's s/step,
min-max spread, process CPU s/step, time to first step, peak RSS, load) is printed as markdown at
the end and with --report.

--threads N sets OMP_NUM_THREADS/MKL_NUM_THREADS for every run (torch's intra-op threads; XLA keeps
its own pool). On a machine loaded far beyond its cores, two torch threads that must meet at every
operator's barrier wait for each other's time slices, and tiny steps become 50-150x slower and
erratic; one thread per process does not have that failure mode, so the ratios stay readable.
"""

import argparse
import datetime
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402


def parse_arm(text):
    name, _, spec = text.partition("=")
    root, _, rest = spec.partition(":")
    trainers, _, flags = rest.partition(":")
    if not name or not os.path.isdir(root):
        raise SystemExit(f"--arm {text!r}: expected NAME=ROOT[:TRAINERS[:FLAGS]] with an existing ROOT")
    return {"name": name, "root": os.path.abspath(root), "trainers": [t for t in trainers.split(",") if t],
            "flags": flags.split()}


def summarise(rows, arms):
    """Markdown lines: one row per (configuration, arm), then the ratio of each arm to the first."""
    by = {}
    for r in rows:
        by.setdefault((r["name"], r["arm"]), []).append(r)
    names = list(dict.fromkeys(r["name"] for r in rows))
    out = ["| configuration | arm | code | runs ok | s/step: median of runs | min–max | spread | "
           "CPU s/step: median (min–max) | time to first step (s), median | peak RSS (GB), median "
           "| load (1 min) at start, min–max |",
           "|---|---|---|---:|---:|---|---:|---|---:|---:|---|"]
    medians = {}
    for name in names:
        for arm in arms:
            runs = by.get((name, arm["name"]), [])
            if not runs:
                continue
            ok = [r for r in runs if r.get("status") == "ok"]
            loads = [float(r["loadavg_start"].split()[0]) for r in runs if r.get("loadavg_start")]
            if not ok:
                out.append(f"| {name} | {arm['name']} | {runs[0].get('code', '?')} | 0/{len(runs)} | – | – | – | – | – "
                           f"| – | {runs[0].get('error', '')[:80]} |")
                continue
            s = [r["s_per_step_median"] for r in ok]
            med = statistics.median(s)
            medians[(name, arm["name"])] = med
            c = [r["cpu_s_per_step_median"] for r in ok if "cpu_s_per_step_median" in r]
            cpu = f"{statistics.median(c):.4f} ({min(c):.4f}–{max(c):.4f})" if c else "–"
            out.append(f"| {name} | {arm['name']} | {ok[0].get('code', '?')} | {len(ok)}/{len(runs)} | {med:.4f} "
                       f"| {min(s):.4f}–{max(s):.4f} | ±{(max(s) - min(s)) / 2 / med:.0%} | {cpu} "
                       f"| {statistics.median(r['first_step_s'] for r in ok):.1f} "
                       f"| {statistics.median(r['peak_rss_gb'] for r in ok):.2f} "
                       f"| {min(loads):.2f}–{max(loads):.2f} |")
    # Paired: each arm's run over the baseline's run of the same round (adjacent in time, so both saw
    # about the same load); the median over rounds and the min-max of those ratios.
    out += ["", "| configuration | arm | ratio of medians (s/step) | paired ratio, wall: median (min–max) "
                "| paired ratio, CPU: median (min–max) | rounds |", "|---|---|---:|---|---|---:|"]
    for name in names:
        base = medians.get((name, arms[0]["name"]))
        for arm in arms[1:]:
            if not base or (name, arm["name"]) not in medians:
                continue
            pairs = []
            for a in by.get((name, arm["name"]), []):
                b = [r for r in by.get((name, arms[0]["name"]), []) if r["round"] == a["round"]]
                if b and a.get("status") == "ok" and b[0].get("status") == "ok":
                    pairs.append((a, b[0]))
            wall = [a["s_per_step_median"] / b["s_per_step_median"] for a, b in pairs]
            cpu = [a["cpu_s_per_step_median"] / b["cpu_s_per_step_median"] for a, b in pairs
                   if "cpu_s_per_step_median" in a and "cpu_s_per_step_median" in b]

            def span(xs):
                return f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f})" if xs else "–"

            out.append(f"| {name} | {arm['name']} / {arms[0]['name']} | {medians[(name, arm['name'])] / base:.2f}× "
                       f"| {span(wall)} | {span(cpu)} | {len(pairs)} |")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", action="append", default=[], help="NAME=ROOT[:TRAINERS[:FLAGS]] (repeatable; first = baseline)")
    parser.add_argument("--only", action="append", default=[], help="configurations of bench/run.py (exact names or parts)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each arm runs each configuration once a round)")
    parser.add_argument("--out", default=os.path.join(bench.WORK, "ab_results.json"))
    parser.add_argument("--report", action="store_true", help="only print the summary of --out")
    parser.add_argument("--baseline", default=None, help="with --report: the arm the others are divided by (default: the first)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run")
    args = parser.parse_args(argv)

    data = {"rows": [], "arms": []}
    if args.report:
        with open(args.out) as f:
            data = json.load(f)
        arms = data["arms"]
        if args.baseline:
            arms = [a for a in arms if a["name"] == args.baseline] + [a for a in arms if a["name"] != args.baseline]
        print("\n".join(summarise(data["rows"], arms)))
        return 0
    arms = [parse_arm(a) for a in args.arm]
    if len(arms) < 2:
        parser.error("give at least two --arm")
    configs = [c for c in bench.configurations() if any(o in c[0] for o in args.only)]
    if not configs:
        parser.error("--only chose no configuration")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    data = {"arms": arms, "rows": [], "machine": bench.machine_info(), "env": env,
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    images = bench.ensure_images()
    for round_index in range(args.runs):
        order = arms[round_index % len(arms):] + arms[:round_index % len(arms)]
        for config in configs:
            for arm in order:
                if arm["trainers"] and config[1] not in arm["trainers"]:
                    continue
                tag = f"ab-{config[0]}-{arm['name']}-{round_index}"
                result = bench.run_one(config, images, code_root=arm["root"], extra_flags=arm["flags"], tag=tag,
                                       env_extra=env)
                result.update(arm=arm["name"], round=round_index)
                data["rows"].append(result)
                if result.get("status") == "ok":
                    print(f"[ab] {tag}: {result['s_per_step_median']:.4f} s/step (mean {result['s_per_step_mean']:.4f}), "
                          f"first step {result['first_step_s']:.1f} s, peak {result['peak_rss_gb']:.2f} GB", flush=True)
                else:
                    print(f"[ab] {tag}: {result.get('status')}: {result.get('error')}", flush=True)
                with bench.atomic_path(args.out) as tmp:
                    with open(tmp, "w") as f:
                        json.dump(data, f, indent=1)
    data["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with bench.atomic_path(args.out) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    print("\n".join(summarise(data["rows"], arms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
