"""The checks AUTOMATIC1111's webui (v1.10.1, its default "safe" loader) runs on a .pt/.bin file before it loads
it, restated here in our own code so tests can tell whether the webui would accept a file we write.

The webui refuses a file ("Error verifying pickled file ... may be malicious") when
  - it is a zip (torch's default format) with any entry other than <folder>/data.pkl, <folder>/version,
    <folder>/byteorder, <folder>/.data/serialization_id and <folder>/data/<n>, or without exactly one data.pkl;
  - the pickle (data.pkl of a zip; the first 5 pickles of torch's legacy non-zip format: magic number, protocol
    version, system info, the object, the storage keys) names a global outside a short list, or a persistent id
    that is not ('storage', ...).
Both trainers' and the converter's pickled files are checked with check_file() in the tests.

Nothing here calls into torch or numpy: globals resolve to inert stand-ins, so checking a file runs none of its code.
"""

import collections
import os
import pickle
import re
import zipfile

ALLOWED_ZIP_ENTRIES = [re.compile(p) for p in (
    r"^([^/]+)/data\.pkl$",
    r"^([^/]+)/version$",
    r"^([^/]+)/byteorder$",
    r"^([^/]+)/\.data/serialization_id$",
    r"^([^/]+)/data/\d+$",
)]
DATA_PKL = ALLOWED_ZIP_ENTRIES[0]

STORAGE_TYPES = ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                 "BFloat16Storage")
ALLOWED_GLOBALS = frozenset(
    [("collections", "OrderedDict"),
     ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
     ("torch._utils", "_rebuild_device_tensor_from_numpy"),
     ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
     ("numpy", "dtype"), ("numpy", "ndarray"),
     ("__builtin__", "set"), ("builtins", "set"),
     ("_codecs", "encode")]
    + [("torch", name) for name in STORAGE_TYPES])

# The legacy format is a row of pickles; the webui unpickles this many and stops (the raw storage bytes follow).
LEGACY_PICKLES = 5


class Refused(Exception):
    """The webui's loader would refuse the file (the message says why)."""


class StandIn:
    """What an allowed global resolves to here: callable, records nothing, runs nothing."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        return StandIn(f"{self.name}(...)")

    def __repr__(self):
        return f"<{self.name}>"


class _RuleUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.globals_used = set()
        self.persistent_ids = 0

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise Refused(f"global {module}.{name} is not allowed")
        self.globals_used.add(f"{module}.{name}")
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if name == "set":
            return set
        return StandIn(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise Refused(f"persistent id {pid!r} is not a ('storage', ...) tuple")
        self.persistent_ids += 1
        return StandIn("storage")


def _unpickle(file, count):
    unpickler = _RuleUnpickler(file)
    try:
        for _ in range(count):
            unpickler.load()
    except Refused:
        raise
    except Exception as err:  # the webui reports any failure to unpickle as a refusal too
        raise Refused(f"not a readable pickle ({type(err).__name__}: {err})") from err
    return {"globals": unpickler.globals_used, "storages": unpickler.persistent_ids}


def check_file(path):
    """Raise Refused when the webui's loader would refuse path; else return what was seen:
    {"layout": "zip" or "legacy", "globals": set of "module.name", "storages": number of storage ids}."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            return dict(_unpickle(f, LEGACY_PICKLES), layout="legacy")
    with archive:
        names = archive.namelist()
        unexpected = [n for n in names if not any(p.match(n) for p in ALLOWED_ZIP_ENTRIES)]
        if unexpected:
            raise Refused(f"zip entries {unexpected} are not allowed")
        data_pkl = [n for n in names if DATA_PKL.match(n)]
        if len(data_pkl) != 1:
            raise Refused(f"{len(data_pkl)} data.pkl entries, expected one")
        with archive.open(data_pkl[0]) as f:
            return dict(_unpickle(f, 1), layout="zip")


def pickled_files(folder):
    """Relative paths of the files below folder that the webui would open with torch.load: it picks them by name
    (.pt, .bin; .safetensors go to the safetensors reader)."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names if name.lower().endswith((".pt", ".bin")))
