"""The core's side of several processes (textual_inversion_core.processes, preflight.load_run_inputs), with the
processes simulated by threads that share a gather: fast checks of what the 2-host end-to-end tests
(tests/test_multiprocess.py, tests/flax/test_flax_training.py) show with real launchers."""

import os
import shutil
import threading

import numpy as np
import pytest

from helpers import base_args
from textual_inversion_core import checkpoints
from textual_inversion_core.cli import parse_args
from textual_inversion_core.errors import UserError
from textual_inversion_core.preflight import load_run_inputs
from textual_inversion_core.processes import Processes, decode_checkpoint, encode_checkpoint


def on_processes(count, work):
    """work(processes) on `count` threads, each a process of one run; returns each one's result or exception."""
    barrier, slots = threading.Barrier(count, timeout=60), {}

    def gather_for(index):
        def gather(data):
            slots[index] = bytes(data)
            barrier.wait()
            found = [slots[i] for i in range(count)]
            barrier.wait()  # nobody writes the next round's slot before everybody has read this one
            return found
        return gather

    results = [None] * count

    def target(index):
        try:
            results[index] = work(Processes(index, count, gather_for(index)))
        except Exception as err:  # noqa: BLE001 -- handed to the test
            results[index] = err

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a simulated process is still waiting"
    return results


def test_a_failure_on_one_process_is_the_same_one_line_error_on_every_process():
    def work(processes):
        def check():
            if processes.index == 2:
                raise UserError("--init_from 'x.pt' not found; pass an existing file")
            return processes.index
        return processes.agree(check)

    results = on_processes(3, work)
    assert all(isinstance(r, UserError) for r in results), results
    assert {str(r) for r in results} == {"process 2 of 3: --init_from 'x.pt' not found; pass an existing file"}
    assert on_processes(2, lambda p: p.agree(lambda: p.index * 10)) == [0, 10]


def test_a_bug_on_one_process_keeps_its_traceback_there_and_stops_the_others():
    def work(processes):
        def check():
            if processes.index == 1:
                raise KeyError("oops")
        return processes.agree(check)

    first, second = on_processes(2, work)
    assert isinstance(second, KeyError)
    assert isinstance(first, UserError) and str(first) == "process 1 of 2: KeyError: 'oops'"


def test_checkpoint_bytes_round_trip():
    tensors = {"vectors": np.arange(6, dtype=np.float32).reshape(2, 3), "exp_avg": np.full((2, 3), 1e-9, np.float32)}
    path, got, state = decode_checkpoint(encode_checkpoint(("out/checkpoint-2", tensors, {"seed": 7, "step": 2})))
    assert path == "out/checkpoint-2" and state == {"seed": 7, "step": 2}
    assert got.keys() == tensors.keys() and all(np.array_equal(got[k], tensors[k]) for k in tensors)
    assert decode_checkpoint(encode_checkpoint(None)) is None


def test_process_0_s_checkpoint_reaches_a_process_whose_folder_has_none(tiny_pipeline, train_images, tmp_path):
    """Separate output folders: checkpoint-2 is in process 0's only; both resume from it, and process 1 neither
    creates its folder nor looks into it."""
    saved = str(tmp_path / "saved")
    tensors = {"vectors": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    checkpoints.save_checkpoint(saved, 2, tensors, {"seed": 5, "num_vectors": 1})
    outs = [str(tmp_path / f"host{i}") for i in range(2)]
    shutil.copytree(os.path.join(saved, "checkpoint-2"), os.path.join(outs[0], "checkpoint-2"))

    def work(processes):
        args = parse_args(base_args(tiny_pipeline, train_images, outs[processes.index], num_vectors=1,
                                    resume_from_checkpoint="latest"))
        return load_run_inputs(args, processes=processes)

    results = on_processes(2, work)
    for inputs in results:
        assert not isinstance(inputs, Exception), inputs
        assert inputs.resume_state["step"] == 2 and inputs.resume_state["seed"] == 5
        np.testing.assert_array_equal(inputs.resume_tensors["vectors"], tensors["vectors"])
    assert not os.path.exists(outs[1])


def test_other_training_data_on_one_host_stops_every_host(tiny_pipeline, train_images, tmp_path):
    fewer = str(tmp_path / "fewer")
    shutil.copytree(train_images, fewer)
    os.unlink(os.path.join(fewer, sorted(os.listdir(fewer))[0]))

    def work(processes):
        data = train_images if processes.index == 0 else fewer
        return load_run_inputs(parse_args(base_args(tiny_pipeline, data, str(tmp_path / f"out{processes.index}"))),
                               processes=processes)

    results = on_processes(2, work)
    for err in results:
        assert isinstance(err, UserError), err
        assert str(err).startswith("the training data (images, captions, repeats) differs between processes")


@pytest.mark.parametrize("is_main", [True, False])
def test_only_the_first_process_creates_the_output_folder(tiny_pipeline, train_images, tmp_path, is_main):
    """The framework's process index decides, not torch's RANK variable (unset on JAX hosts)."""
    out = str(tmp_path / "out")
    processes = Processes(0 if is_main else 1, 2, gather=lambda data: [data, data])
    load_run_inputs(parse_args(base_args(tiny_pipeline, train_images, out)), processes=processes)
    assert os.path.isdir(out) == is_main
