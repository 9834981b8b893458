#!/usr/bin/env python
"""Run a training script unchanged and record when each of its steps finished.

    python bench/step_timer.py OUT.json SCRIPT.py [script flags...]

Every trainer in this project (and the reference loop) advances a tqdm bar once per optimizer step
and shows the loss in its postfix, so timing tqdm.update and reading set_postfix measures any of
them the same way without touching their code. Written at exit to OUT.json: wall-clock time of each
step (time.time(), comparable with the parent's launch time), the loss of each step, the exit
code and the OS's peak resident set size of this process (VmHWM).

A trainer that keeps the loss on its device between fetches (the Flax trainer's --logging_steps)
advances the bar when a step is *dispatched*, which can be long before it is computed: only the
moments it shows a loss (set_postfix, after bringing the loss to the host) prove that every step so
far is done. Those are recorded as sync_points, [steps done, time, process CPU time], and
bench/run.py times such a trainer between them. step_cpu_times holds the process's CPU time (all
threads, time.process_time()) at each step end: on a loaded machine it moves much less than the
wall clock (but it also counts threads spinning while they wait for each other).

With BENCH_MARK=module:Class.method (e.g. torch_backend.families.base:Family.load_image_side) the moment that
method is entered is recorded in OUT.json's marks (time, the process's peak RSS so far, its RSS now), and OUT.json is
written right then, so the numbers survive a run the watchdog kills later; with BENCH_STOP_AT_MARK=1 the run then
ends (exit code 0): a row that measures only what comes before that phase (a model too big for the machine).
With BENCH_RSS_TRACE=1 the resident size is sampled every 0.1 s into OUT.json's rss_trace.
With BENCH_PROFILE_STEP=N (torch scripts), steps N+1 and N+2 run under torch.profiler and the
operator table is written next to OUT.json as OUT.profile.txt.
"""

import json
import os
import runpy
import sys
import time


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_record(record, out_path):
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, out_path)


class StopAtMark(SystemExit):
    """Raised at BENCH_MARK when BENCH_STOP_AT_MARK is set (a SystemExit: the scripts catch Exception only)."""


def install_mark(spec, record, out_path, stop):
    """Wrap the method spec names ("module:Class.method") so that entering it records a mark (see the docstring)."""
    import importlib

    module_name, qualname = spec.split(":")
    owner = importlib.import_module(module_name)
    *path, method = qualname.split(".")
    for name in path:
        owner = getattr(owner, name)
    original = getattr(owner, method)

    def marked(*args, **kwargs):
        record.setdefault("marks", []).append({"name": spec, "time": time.time(), "steps_done":
                                               len(record["step_end_times"]), "peak_rss_bytes": peak_rss_bytes(),
                                               "rss_bytes": current_rss_bytes()})
        write_record(record, out_path)
        if stop:
            raise StopAtMark(0)
        return original(*args, **kwargs)

    setattr(owner, method, marked)


def main():
    out_path, script, script_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    record = {"script": script, "step_end_times": [], "step_cpu_times": [], "losses": [], "sync_points": [],
              "exit_code": None}
    profile_step = int(os.environ.get("BENCH_PROFILE_STEP", "-1"))
    profiler = []

    from tqdm import std

    original_update, original_set_postfix = std.tqdm.update, std.tqdm.set_postfix

    def update(self, n=1):
        # Only the training bar ("Steps"), not download/shard/validation bars.
        if str(getattr(self, "desc", "")).startswith("Steps"):
            record["step_end_times"].append(time.time())
            record["step_cpu_times"].append(time.process_time())
            done = len(record["step_end_times"])
            if done == profile_step:
                import torch

                profiler.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=False))
                profiler[0].__enter__()
            elif profiler and done == profile_step + 2:
                profiler[0].__exit__(None, None, None)
                table = profiler[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                with open(os.path.splitext(out_path)[0] + ".profile.txt", "w") as f:
                    f.write(f"steps {profile_step + 1}-{profile_step + 2} of {script}\n{table}\n")
                profiler.clear()
        return original_update(self, n)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        if str(getattr(self, "desc", "")).startswith("Steps"):
            loss = kwargs.get("loss", (ordered_dict or {}).get("loss"))
            if loss is not None:
                record["sync_points"].append([len(record["step_end_times"]), time.time(), time.process_time()])
                try:
                    record["losses"].append(float(loss))
                except (TypeError, ValueError):
                    pass
        return original_set_postfix(self, ordered_dict, refresh, **kwargs)

    std.tqdm.update, std.tqdm.set_postfix = update, set_postfix
    if os.environ.get("BENCH_RSS_TRACE"):  # diagnostic: resident memory every 0.1 s, to see which phase peaks
        import threading

        page = os.sysconf("SC_PAGE_SIZE")
        trace = record.setdefault("rss_trace", [])

        def sample():
            while True:
                with open("/proc/self/statm") as f:
                    trace.append((round(time.time(), 2), int(f.read().split()[1]) * page))
                time.sleep(0.1)

        threading.Thread(target=sample, daemon=True).start()
    # Full-precision loss where the script also logs it through accelerate (the bar shows 4 digits).
    # Opt-in, so that a script which does not use torch does not pay for importing it.
    try:
        if os.environ.get("BENCH_LOG_HOOK") != "accelerate":
            raise ImportError
        import accelerate

        original_log = accelerate.Accelerator.log

        def log(self, values, step=None, log_kwargs=None):
            if "loss" in values:
                record.setdefault("logged_losses", []).append(float(values["loss"]))
            return original_log(self, values, step=step, log_kwargs=log_kwargs or {})

        accelerate.Accelerator.log = log
    except ImportError:
        pass
    sys.argv = [script] + script_args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if os.environ.get("BENCH_MARK"):
        install_mark(os.environ["BENCH_MARK"], record, out_path, bool(os.environ.get("BENCH_STOP_AT_MARK")))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        record["exit_code"] = code
        record["peak_rss_bytes"] = peak_rss_bytes()
        write_record(record, out_path)
    sys.exit(code)


if __name__ == "__main__":
    main()
