"""What the commands (train.py, evaluate.py, data.py, checkpoint.py) share: argument checks, process
set-up, and how a run ends on bad input.

The rule for bad input: a flag out of range ends the run before any model loads, with argparse's
message and exit code 2. Bad input a user can fix (a malformed corpus line, a checkpoint that does not
match its config, a missing file) raises `InputError`; `run` prints it as one line (the message names
the file and line, or the tensor) and exits with code 1. A traceback is shown only with SCOTD_DEBUG=1.
"""

import argparse
import ctypes
import os
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent


class InputError(Exception):
    """Bad input a user can fix: the message names the file and line (or tensor) and what is wrong."""

    exit_code = 1


class Busy(InputError):
    """Another process is writing the same output (one_writer): refused before anything is touched, exit 2."""

    exit_code = 2


def run(main):
    """The scripts' entry point: main() with bad input and Ctrl-C turned into one line and an exit code."""
    debug = os.environ.get("SCOTD_DEBUG") == "1"
    try:
        return main()
    except (InputError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)


# -----------------------------------------------------------------------------
# argparse types: a value out of range is a usage error (exit 2) before anything loads


def _number(kind, low, low_inclusive, high=None, what=""):
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if x != x or (x < low if low_inclusive else x <= low) or (high is not None and x > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return x
    parse.__name__ = what
    return parse


positive_int = _number(int, 1, True, what=">= 1")
nonneg_int = _number(int, 0, True, what=">= 0")
positive_float = _number(float, 0.0, False, what="> 0")
nonneg_float = _number(float, 0.0, True, what=">= 0")
fraction = _number(float, 0.0, False, 1.0, what="in (0, 1]")
unit_interval = _number(float, 0.0, True, 1.0, what="in [0, 1]")


def check_device(parser, device):
    """--device: 'cpu', 'cuda' or 'cuda:N' that this machine has."""
    import torch

    if device is None:
        return
    if device != "cpu" and not device.startswith("cuda"):
        parser.error(f"argument --device: expected cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {device} requested but this torch has no CUDA device")


def get_args(parser, check, argv=None):
    """A command's flags: parsed by parser() and checked by check(p, args) (argparse's message and exit 2 on a
    bad one) -> what check returns."""
    p = parser()
    return check(p, p.parse_args(argv))


def check_model_folder(parser, flag, folder):
    """A model flag (--init, --checkpoint, --teacher, ...): an HF-layout folder, i.e. one with a config.json."""
    if folder is not None and not (Path(folder) / "config.json").is_file():
        parser.error(f"argument {flag}: {folder} is not a model folder (no config.json)")


def device_type(device):
    """'cuda' or 'cpu': where --device puts a run (None: CUDA if this machine has it)."""
    import torch

    return "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"


def default_dtype(device, dtype=None):
    """--dtype, else its default on `device` (a device or its type): bfloat16 on CUDA, float32 on CPU."""
    return dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")


def default_compile(device, compile=None):
    """--compile/--no-compile, else its default on `device` (a device or its type): on CUDA, off on a CPU (where
    compiling each new shape costs more than it saves)."""
    return str(device).startswith("cuda") if compile is None else compile


def check_file(parser, flag, path):
    if path is not None and not os.path.isfile(path):
        parser.error(f"argument {flag}: no such file: {path}")


def changed_settings(saved, now, keys=None, name=str):
    """What differs between the settings a run saved and this invocation's -> ["name: old -> new", ...], for a
    refusal that names each change. Nested dicts compare key by key ("sampling.n"); `keys`: only these;
    `name(key)`: how a key is shown (train.py: as its flag, "--lr")."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    keys = keys if keys is not None else list(dict.fromkeys([*flat_saved, *flat_now]))
    missing = object()

    def show(v):  # one line, and short: a changed prompt is named, not printed
        text = "(not set)" if v is missing else " ".join(str(v).split())
        return text if len(text) <= 40 else f"{text[:37]}... ({len(str(v)):,} chars)"
    return [f"{name(k)} {show(flat_saved.get(k, missing))} -> {show(flat_now.get(k, missing))}"
            for k in keys if flat_saved.get(k, missing) != flat_now.get(k, missing)]


def _flatten(settings, prefix=""):
    out = {}
    for k, v in settings.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def portable(path):
    """A path as a record should keep it: relative to the repository when inside it, "~/..." under the home
    folder, else absolute -- so a file written in one clone reads the same in another."""
    path = Path(path).expanduser().resolve()
    for base, shown in ((ROOT, None), (Path.home().resolve(), "~")):
        if path.is_relative_to(base):
            rel = path.relative_to(base).as_posix()
            return f"{shown}/{rel}" if shown else rel
    return str(path)


# -----------------------------------------------------------------------------
# outputs: one writer each, written durably


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
    import fcntl

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


def fsync(path):
    """Flush a file's or a folder's data (a folder: its entries, e.g. a rename) to the disk: what a crash or a
    power cut leaves is then what was written, not an empty or missing file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# process set-up


def keep_freed_memory(device):
    """On CPU, let glibc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc hands large freed blocks back (munmap, or trimming the heap), so a training step,
    which allocates and frees gigabytes of activations and gradients, page-faults them all in again the
    next step. Raising the mmap and trim thresholds keeps them. Measured on 2 cores: a third fewer page
    faults, SmolLM2 training steps 15-25 % faster, peak RSS 2-3 % higher. A no-op without glibc."""
    if device.type != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
