"""The processes of one run as the core sees them: which one this is, and one collective to talk with the others.

A run on several hosts starts one process per host (or per GPU). Each reads its own copy of the inputs, so
a problem on one host (a missing file, other images) must stop every host with the same line: a process
that stops alone leaves the others waiting at the next collective until killed. Only process 0 writes,
so only its output folder holds checkpoints; it decides where a run resumes and sends that checkpoint
(vectors, AdamW moments and state: kilobytes) to the others, who need no shared disk.

The trainers supply gather (bytes in, every process's bytes out, in process order) from their framework:
torch.distributed's all_gather_object, jax's process_allgather.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    gather: Callable[[bytes], list] | None = None  # needed when count > 1

    @property
    def is_main(self):
        return self.index == 0

    def agree(self, work):
        """work() on every process; when it fails on any, every process raises that failure's one line."""
        try:
            result, failure = work(), None
        except Exception as err:  # noqa: BLE001 -- told to the other processes, then raised here as it is
            result, failure = None, err
        if self.count == 1:
            if failure is not None:
                raise failure
            return result
        told = "" if failure is None else (str(failure) if isinstance(failure, UserError)
                                           else f"{type(failure).__name__}: {failure}")
        messages = [m.decode("utf-8") for m in self.gather(told.encode("utf-8"))]
        failed = [(i, m) for i, m in enumerate(messages) if m]
        if failure is not None and not isinstance(failure, UserError):
            raise failure  # a bug: its traceback, here; the other processes stop with one line
        if failed:
            index, message = failed[0]
            raise UserError(f"process {index} of {self.count}: {message}")
        return result

    def broadcast(self, data):
        """Process 0's bytes, on every process (the others' data is ignored)."""
        if self.count == 1:
            return data
        return self.gather(data if self.is_main else b"")[0]

    def share_int(self, value):
        """Process 0's integer, on every process."""
        return int(self.broadcast(str(int(value)).encode()))

    def check_same(self, what, value, fix):
        """Stop every process in one line when `value` (JSON-able) differs between processes."""
        if self.count == 1:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest().encode()
        digests = self.gather(digest)
        differing = [i for i, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise UserError(f"{what} differs between processes (process {differing[0]} and process 0 of "
                            f"{self.count}); {fix}")


ONE_PROCESS = Processes()


def encode_checkpoint(found):
    """(path, tensors, state) or None as bytes: a JSON line (path, state), then the safetensors bytes."""
    if found is None:
        return b""
    from safetensors.numpy import save

    path, tensors, state = found
    return json.dumps({"path": path, "state": state}).encode("utf-8") + b"\n" + save(dict(tensors))


def decode_checkpoint(data):
    if not data:
        return None
    from safetensors.numpy import load

    head, _, body = data.partition(b"\n")
    header = json.loads(head.decode("utf-8"))
    return header["path"], load(body), header["state"]
