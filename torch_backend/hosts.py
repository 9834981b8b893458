"""Several PyTorch processes (GPUs, machines): the collective the core's Processes needs."""

from textual_inversion_core.processes import Processes


def processes(accelerator):
    """This process (Accelerate's index) and a gather over all of them (the core's Processes)."""
    if accelerator.num_processes == 1:
        return Processes()
    import torch.distributed as dist

    def gather(data):
        found = [None] * accelerator.num_processes
        dist.all_gather_object(found, bytes(data))
        return found

    return Processes(accelerator.process_index, accelerator.num_processes, gather)
