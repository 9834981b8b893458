"""Several JAX processes (hosts): starting jax.distributed, the collective the core's Processes needs, and the
barrier at the end of a run.

Both talk through the coordination service that jax.distributed starts (its key-value store and barriers), not
through device collectives: those time out after 30 s on CPU (gloo) while hosts may legitimately spend minutes
apart (decoding images before training, process 0's final save and Hub push after it).
"""

import itertools
import os

from textual_inversion_core.processes import Processes

# How long the hosts wait for each other at start (each decodes its images) and at the end (process 0 writes the
# final files and pushes to the Hub): a dead process is noticed sooner, by jax's heartbeat (100 s).
WAIT_MS = 24 * 3600 * 1000


def start_jax(args):
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # Several hosts: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the job (on a
        # TPU pod jax finds the process count and index itself).
        # CPU devices need gloo for cross-process collectives (accelerators have their own).
        jax.config.update("jax_cpu_collectives_implementation",
                          os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo"))
        jax.distributed.initialize(
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
            process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    if args.allow_tf32:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")


def _client():
    # jax keeps its coordination-service client here (orbax reads it the same way); it has no public accessor.
    from jax._src import distributed

    return distributed.global_state.client


def processes():
    """This process and a gather over all of them (the core's Processes)."""
    import jax

    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return Processes()
    calls = itertools.count()  # every process makes the same calls in the same order: one key prefix per call

    def gather(data):
        prefix = f"textual_inversion/gather/{next(calls)}"
        client = _client()
        client.key_value_set_bytes(f"{prefix}/{index}", bytes(data))
        return [bytes(client.blocking_key_value_get_bytes(f"{prefix}/{i}", WAIT_MS)) for i in range(count)]

    return Processes(index, count, gather)


def wait_for_every_process(name):
    """A barrier: returns once every process has reached it (process 0 after its writes). Without it the others
    would wait in jax's shutdown barrier, which aborts every process after 300 s."""
    import jax

    if jax.process_count() > 1:
        _client().wait_at_barrier(f"textual_inversion/{name}", WAIT_MS)
