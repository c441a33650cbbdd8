"""Errors a user can fix, and how every file is written: what every other module may import (this one imports
nothing of the project).

The rule for bad input: a user's mistake (a malformed corpus line, a checkpoint that does not match its config, a
missing file) raises `InputError`, whose message names the file and line (or the tensor); `cli.run` prints it as
one line. A file is written whole or not at all (`write_file`: a temporary beside it, fsync'd, renamed over the
old one; `append_text`: a line appended whole, or cut off again), and one process writes an output (`one_writer`).
"""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """Bad input a user can fix: the message names the file and line (or tensor) and what is wrong."""

    exit_code = 1


class Busy(InputError):
    """Another process is writing the same output (one_writer): refused before anything is touched, exit 2."""

    exit_code = 2


def cache_dir():
    """Where converted students and token caches live (SCOTD_CACHE, default ~/.cache/scotd)."""
    return Path(os.environ.get("SCOTD_CACHE", Path.home() / ".cache" / "scotd"))


# -----------------------------------------------------------------------------
# Outputs: one writer each, written durably


@contextmanager
def one_writer(path, folder=True, rank0=True):
    """Hold an exclusive lock on an output for as long as the block runs: `<path>/.lock` for an output folder,
    `<path>.lock` beside an output file. A second process that wants it is refused at once (Busy, exit 2),
    naming the path and the pid that holds it, before it touches anything. The kernel drops the lock of a
    process that dies (flock), so a kill -9 leaves nothing to clean up. Under torchrun only rank 0 writes,
    so only rank 0 locks (rank0=False: a no-op). An output that cannot be created is refused the same way."""
    if not rank0:
        yield
        return
    path = Path(path)
    lock = path / ".lock" if folder else path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise Busy(f"{path}: cannot write there ({e.strerror or e}); choose another output") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise Busy(f"{path}: another process (pid {holder}) is writing there; wait for it to end, or choose "
                       "another output") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


class WriteError(InputError):
    """An output that could not be written (a full disk, a quota, a read-only folder, a library's writer
    failing): the message names the file and the cause; the previous file or folder is left as it was."""


def _plain_mode():
    """The mode a plain open() gives a new file under this process's umask (read once, at import: os.umask
    can only be read by setting it, and no thread is running yet)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


PLAIN_MODE = _plain_mode()


def _cause(e):
    """An exception as a short cause: an OSError's strerror, else the first line of its message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def writing(path):
    """Any exception raised inside the block -- OSError, or a library's own error type (safetensors'
    SafetensorError, torch.save's RuntimeError, matplotlib's, zlib's) -- becomes WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever the writer raises, the user needs the file and the cause
        raise WriteError(f"{path}: cannot write it ({_cause(e)}); free some space or choose another output") from e


def write_file(path, write, sync=True):
    """Write `path` atomically through write(tmp), which fills a temporary file beside it: the temporary is
    fsync'd, given the mode a plain open() gives (PLAIN_MODE), and renamed over `path`. Whatever fails while
    writing ends as WriteError naming `path`, the temporary removed and the previous `path` untouched. Every
    file the commands write goes through this (or write_folder, append_text)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.chmod(tmp, PLAIN_MODE)
            if sync:
                fsync(tmp)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path, text, sync=True):
    """write_file for a text (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), sync)


def append_text(path, text, sync=False):
    """Append `text` to `path` (created with PLAIN_MODE if missing) in whole: a write that fails part-way (a full
    disk) is cut off again, so no half line stays for a reader to take for whole, and ends as WriteError.
    sync: fsync after (a crash of the machine then keeps it too)."""
    append_bytes(path, text.encode("utf-8"), sync)


def append_bytes(path, payload, sync=False):
    """append_text for bytes (distill.SidecarWriter's records)."""
    payload = memoryview(payload)
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            with writing(path):
                while payload:
                    payload = payload[os.write(fd, payload):]
                if sync:
                    os.fsync(fd)
        except BaseException:  # a failure or Ctrl-C mid-write: the file as it was
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def fsync(path):
    """Flush a file's or a folder's data (a folder: its entries, e.g. a rename) to the disk: what a crash or a
    power cut leaves is then what was written, not an empty or missing file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
