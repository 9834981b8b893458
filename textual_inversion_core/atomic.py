"""Atomic file and directory writes: a crash leaves the old complete file or the new one, never half."""

import contextlib
import os
import shutil
import tempfile

from .errors import UserError


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode(directory=False):
    """The permissions open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _write_error(path, err):
    """A failed write (disk full, quota, permissions) as one line; what was saved before is intact."""
    return UserError(f"cannot write {path!r} ({err.strerror or err}); free disk space or write elsewhere "
                     "(--output_dir). Files written before are intact: a run resumes with --resume_from_checkpoint latest")


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path in the same folder; on success it is fsynced and renamed to final_path."""
    folder = os.path.dirname(os.path.abspath(final_path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(final_path) + "-", dir=folder)
    except OSError as err:
        raise _write_error(final_path, err) from err
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
        _fsync_dir(folder)
    except OSError as err:
        raise _write_error(final_path, err) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final_dir):
    """Yield a temporary folder beside final_dir; on success it replaces final_dir in one rename.

    Temporary folders start with '.tmp-' so that nothing listing checkpoints ever sees them.
    """
    parent = os.path.dirname(os.path.abspath(final_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final_dir) + "-", dir=parent)
    except OSError as err:
        raise _write_error(final_dir, err) from err
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.isdir(final_dir):
            # Move the old one aside first: rename() cannot replace a non-empty folder.
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(final_dir) + "-", dir=parent)
            os.rmdir(old)
            os.rename(final_dir, old)
            os.rename(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final_dir)
        _fsync_dir(parent)
    except OSError as err:
        raise _write_error(final_dir, err) from err
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
