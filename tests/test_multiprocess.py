"""Two processes (accelerate launch / torchrun, gloo, CPU) with --train_batch_size 1 equal one process with batch 2:
same vectors, same logged loss (the mean over ranks), and only rank 0 writes files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import TORCH_SCRIPT, base_args, free_port, run_hosts, run_in_process, run_script, script_env
from textual_inversion_core import checkpoints

# Measured on the tiny pipeline: 2-process vs 1-process vectors differ by at most 1.2e-7 (summation
# order of the gradient all-reduce vs. the batch mean), the logged loss by 1.2e-7 (1 ulp); both limits are 1e-6.
VECTOR_TOLERANCE = 1e-6
LOSS_TOLERANCE = 1e-6
# The CLIP scores of the eval (rank 0 samples pictures of those vectors, 1e-7 apart, through 25 sampler steps): equal
# but for editability at step 3, 1.2e-5 and 1.37e-5 apart in two runs (Intel; the scores are 0.26-0.9), so 1e-4.
CLIP_SCORE_TOLERANCE = 1e-4
# Resumed on 2 machines, the vectors and AdamW moments differed from 1 process by at most 1.3e-6 of their largest
# value (all-reduce vs batch-mean rounding; the moments are as small as 2e-8); a wrong resume point differs by the
# whole value.
RELATIVE_TOLERANCE = 1e-4

# Runs the trainer as __main__ with an audit hook that records every write-like file operation under
# the output folder, per rank, into AUDIT_DIR/rank-N.json at exit.
AUDIT_WRAPPER = r'''
import atexit, json, os, runpy, sys
out = os.path.realpath(os.environ["AUDIT_OUTPUT_DIR"])
rank = os.environ.get("RANK", "0")
seen = []

def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(out)
    except (TypeError, ValueError):
        return False

def hook(event, args):
    if event == "open" and args[0] is not None and inside(args[0]):
        mode, flags = args[1] or "r", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            seen.append([event, os.fsdecode(args[0])])
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate") \
            and args and isinstance(args[0], (str, bytes, os.PathLike)) and inside(args[0]):
        seen.append([event, os.fsdecode(args[0])])

@atexit.register
def report():
    with open(os.path.join(os.environ["AUDIT_DIR"], f"rank-{rank}.json"), "w") as f:
        json.dump(seen, f)

sys.addaudithook(hook)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
'''


def scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "textual_inversion"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def layout(out):
    """Relative file paths, with TensorBoard's time-stamped folder and file names made comparable."""
    names = []
    for root, _, files in os.walk(out):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), out)
            rel = re.sub(r"/\d+\.\d+/", "/<time>/", rel)
            names.append(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", rel))
    return sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, accumulation, num_vectors", [("accelerate", 1, 1), ("torchrun", 2, 2)])
def test_two_processes_equal_one_with_the_same_global_batch(tiny_pipeline, train_images, tiny_clip, tmp_path,
                                                            launcher, accumulation, num_vectors):
    settings = dict(max_train_steps=6, gradient_accumulation_steps=accumulation, num_vectors=num_vectors,
                    checkpointing_steps=3, save_steps=3, report_to="tensorboard", lr_scheduler="cosine",
                    lr_warmup_steps=2, validation_split=0.25)  # and the validation loss, measured by rank 0 alone
    if launcher == "accelerate":  # and the CLIP scores of the saved steps (cheap: 1 sample, 2 sampler steps)
        settings.update(eval_clip_model=tiny_clip, eval_num_samples=1, eval_inference_steps=2)
    single = str(tmp_path / "single")
    result = run_in_process(base_args(tiny_pipeline, train_images, single, train_batch_size=2, **settings))
    assert result.returncode == 0, result.stderr[-3000:]

    double = str(tmp_path / "double")
    audit = tmp_path / "audit"
    audit.mkdir()
    wrapper = tmp_path / "audited.py"
    wrapper.write_text(AUDIT_WRAPPER)
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(wrapper)]
    else:  # on CPU, accelerate starts several processes only with --multi_gpu (+ ACCELERATE_USE_CPU)
        command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", "0", str(wrapper)]
    env = {"ACCELERATE_USE_CPU": "1", "AUDIT_DIR": str(audit), "AUDIT_OUTPUT_DIR": double}
    result = run_script(base_args(tiny_pipeline, train_images, double, train_batch_size=1, **settings),
                        launcher=command, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "processes = 2" in result.stderr and "global batch = " + str(2 * accumulation) in result.stderr

    # The same vectors, at every saved step and at the end.
    for name in ("learned_embeds-steps-3.safetensors", "learned_embeds.safetensors"):
        a, b = (load_file(os.path.join(d, name))["<cat-toy>"] for d in (single, double))
        diff = float(np.abs(a - b).max())
        print(f"accumulation {accumulation}, {name}: max |1-process - 2-process| = {diff:.3g}")
        assert diff <= VECTOR_TOLERANCE, (name, diff)
    one_loss, two_loss = scalars(single, "loss"), scalars(double, "loss")
    assert [s for s, _ in one_loss] == [s for s, _ in two_loss] == list(range(1, 7))
    loss_diff = max(abs(a - b) for (_, a), (_, b) in zip(one_loss, two_loss))
    print(f"accumulation {accumulation}: max logged-loss difference = {loss_diff:.3g}")
    assert loss_diff <= LOSS_TOLERANCE  # the 1-process loss is the batch mean = the mean over the 2 ranks
    assert scalars(single, "lr") == scalars(double, "lr")
    # The validation loss: measured once (rank 0), on the same fixed draws, so the same numbers as one process.
    one_eval, two_eval = (json.load(open(os.path.join(d, "eval.json")))["steps"] for d in (single, double))
    assert sorted(one_eval) == sorted(two_eval) == ["3", "6"]
    for step in one_eval:
        for key in ("validation_loss", "validation_baseline"):
            assert abs(one_eval[step][key] - two_eval[step][key]) <= LOSS_TOLERANCE, (step, key)
        if launcher == "accelerate":
            for key in ("reconstruction", "editability"):
                score_diff = abs(one_eval[step][key] - two_eval[step][key])
                print(f"accumulation {accumulation}, step {step}: {key} 1-process - 2-process = {score_diff:.3g}")
                assert score_diff <= CLIP_SCORE_TOLERANCE, (step, key)
            assert one_eval[step]["samples"] == two_eval[step]["samples"] == 5
    assert [s for s, _ in scalars(single, "loss/validation")] == [s for s, _ in scalars(double, "loss/validation")] == [3, 6]

    # Only rank 0 writes: the same files as the single run, and rank 1 made no write-like call there.
    assert layout(double) == layout(single)
    rank0 = json.load(open(audit / "rank-0.json"))
    rank1 = json.load(open(audit / "rank-1.json"))
    assert any("learned_embeds.safetensors" in path for _, path in rank0), rank0  # the audit sees writes
    assert rank1 == [], rank1


@pytest.mark.slow
def test_two_process_run_resumes_exactly(tiny_pipeline, train_images, tmp_path):
    """A 1-process run's checkpoint-3, resumed with 2 processes, ends equal to the uninterrupted 1-process run."""
    settings = dict(max_train_steps=6, checkpointing_steps=3, report_to="none", lr_scheduler="linear",
                    lr_warmup_steps=2, gradient_accumulation_steps=2)
    single = str(tmp_path / "single")
    result = run_in_process(base_args(tiny_pipeline, train_images, single, train_batch_size=2, **settings))
    assert result.returncode == 0, result.stderr[-3000:]
    part = str(tmp_path / "part")
    os.makedirs(part)
    shutil.copytree(os.path.join(single, "checkpoint-3"), os.path.join(part, "checkpoint-3"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script(base_args(tiny_pipeline, train_images, part, train_batch_size=1,
                                  resume_from_checkpoint="latest", **settings),
                        launcher=torchrun, env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    assert "at step 3" in result.stderr
    a, b = (load_file(os.path.join(d, "learned_embeds.safetensors"))["<cat-toy>"] for d in (single, part))
    diff = float(np.abs(a - b).max())
    print(f"1-process checkpoint resumed on 2 processes: max |diff| = {diff:.3g}")
    assert diff <= VECTOR_TOLERANCE


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step(tiny_pipeline, train_images, tmp_path):
    """torchrun forwards SIGTERM to both workers; they agree on the step, rank 0 saves, resume works."""
    out = str(tmp_path / "out")
    log_path = str(tmp_path / "run.log")
    settings = dict(max_train_steps=100000, checkpointing_steps=0, save_steps=0, train_batch_size=1)
    env = script_env({"ACCELERATE_USE_CPU": "1"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TORCH_SCRIPT]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command + base_args(tiny_pipeline, train_images, out, **settings), env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while "loss=" not in open(log_path, encoding="utf-8", errors="replace").read():
        assert process.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(120)
    text = open(log_path, encoding="utf-8", errors="replace").read()
    stopped = re.findall(r"stopped by signal at step (\d+)", text)
    assert len(stopped) == 2 and stopped[0] == stopped[1], text[-3000:]  # each rank says so, at the same step
    step = int(stopped[0])
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [step]
    assert os.path.isfile(os.path.join(out, f"learned_embeds-steps-{step}.safetensors"))
    resumed = run_in_process(base_args(tiny_pipeline, train_images, out, resume_from_checkpoint="latest",
                                       **dict(settings, max_train_steps=step + 1, train_batch_size=2)))
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr[-3000:]


@pytest.mark.slow
def test_two_machines_resume_from_a_checkpoint_only_machine_0_has(tiny_pipeline, train_images, tmp_path):
    """accelerate launch --num_machines 2 on localhost (1 process each, gloo, separate output folders: no shared
    disk). checkpoint-2 is in machine 0's folder only: process 0 decides the resume point and sends the checkpoint,
    both resume at step 2, and the result equals the uninterrupted 1-process run with the same global batch."""
    settings = dict(max_train_steps=4, checkpointing_steps=2, report_to="none", lr_scheduler="linear")
    single = str(tmp_path / "single")
    result = run_in_process(base_args(tiny_pipeline, train_images, single, train_batch_size=2, **settings))
    assert result.returncode == 0, result.stderr[-3000:]
    outs = [str(tmp_path / f"machine{i}") for i in range(2)]
    shutil.copytree(os.path.join(single, "checkpoint-2"), os.path.join(outs[0], "checkpoint-2"))
    port = free_port()
    commands = [[os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
                 "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port), "--num_processes", "2", "--mixed_precision", "no",
                 "--dynamo_backend", "no", TORCH_SCRIPT]
                + base_args(tiny_pipeline, train_images, outs[rank], train_batch_size=1,
                            resume_from_checkpoint="latest", **settings) for rank in range(2)]
    results = run_hosts(commands, [{"ACCELERATE_USE_CPU": "1"}] * 2, tmp_path, timeout=420)
    for code, stderr in results:
        assert code == 0, stderr[-5000:]
    assert "processes = 2" in results[0][1] and "at step 2" in results[0][1]
    assert not os.path.exists(outs[1])  # only process 0 writes (or creates) anything
    for name in ("learned_embeds.safetensors", "checkpoint-4/training_state.safetensors"):
        got, want = (load_file(os.path.join(d, name)) for d in (outs[0], single))
        for key in want:  # vectors ~1e-2, AdamW moments down to ~1e-9: each compared against its own size
            diff, size = float(np.abs(got[key] - want[key]).max()), float(np.abs(want[key]).max())
            print(f"resumed on 2 machines, {name} {key}: max |1-process - 2-machine| = {diff:.3g} (max |value| "
                  f"{size:.3g})")
            assert diff <= RELATIVE_TOLERANCE * size, (name, key, diff, size)
