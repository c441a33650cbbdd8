"""What the commands (train.py, evaluate.py, teacher.py, data.py, checkpoint.py) share: argument checks, process
set-up, and how a run ends on bad input or a stop.

The rule for bad input: a flag out of range ends the run before any model loads, with argparse's
message and exit code 2. Bad input a user can fix raises `fileio.InputError`; `run` prints it as one line (the
message names the file and line, or the tensor) and exits with code 1. A traceback is shown only with
SCOTD_DEBUG=1. Ctrl-C and SIGTERM stop a command cleanly (130 / 143; `stopping_cleanly`).
"""

import argparse
import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import field, fields, is_dataclass
from pathlib import Path

import torch

from fileio import InputError
from model import DTYPES

ROOT = Path(__file__).resolve().parent


def run(main):
    """The scripts' entry point: main() with bad input, Ctrl-C and SIGTERM (a scheduler's stop, `timeout`) turned
    into one line and an exit code (1 or 2; 130 / 143). A script says how far it got where it can: stopping_cleanly."""
    debug = os.environ.get("SCOTD_DEBUG") == "1"
    try:
        with sigterm_interrupts():
            return main()
    except (InputError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 1))
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"interrupted ({signal.Signals(exit_code(e) - 128).name})", file=sys.stderr)
        raise SystemExit(exit_code(e))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def exit_code(interrupt):
    """128 + the signal behind a KeyboardInterrupt: 143 for SIGTERM (sigterm_interrupts), else 130 (Ctrl-C)."""
    return 128 + (signal.SIGTERM if interrupt.args == (signal.SIGTERM,) else signal.SIGINT)


@contextmanager
def sigterm_interrupts():
    """Inside the block SIGTERM raises KeyboardInterrupt(SIGTERM), as Ctrl-C raises KeyboardInterrupt, so one
    `except` stops the run cleanly for both; the previous handler is back after it. (Only the main thread can
    set handlers: elsewhere the block changes nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def stopping_cleanly(said, bar=None):
    """Ctrl-C or SIGTERM inside the block: print `stopped: <said()>; run the same command to continue` and exit
    130 / 143. said() says what is kept (the work done so far, already written); `bar`, a progress bar, is closed
    first, and before any other error's line too."""
    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt as e:
        if bar is not None:
            bar.close()
        print(f"stopped: {said()}; run the same command to continue", flush=True)
        raise SystemExit(exit_code(e)) from None
    except BaseException:
        if bar is not None:
            bar.close()
        raise


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


# -----------------------------------------------------------------------------
# Settings declared once: a dataclass field that is also a flag (train.py's RunConfig), and the device flags
# every command shares

MATCH, MAY_CHANGE, NOT_SAVED = "must match", "may change", "not saved"  # what --resume does with a setting


def flag(default=None, help="", resume=MAY_CHANGE, **argparse_kw):
    """A setting declared once: a dataclass field that add_flags turns into the flag --name-with-dashes (help
    text and argparse's keywords: type, choices, action, ...), and what a --resume may do with it: MATCH (a
    resumed run must use the same value), MAY_CHANGE, or NOT_SAVED (not part of the saved settings)."""
    return field(default=default, metadata={"help": help, "resume": resume, "argparse": argparse_kw})


def add_flags(parser, settings):
    """One flag for each field of `settings` (a dataclass, or a list of flag() fields with names) that flag()
    made, in order; a dataclass made of groups (dataclass bases) gets an argument group each, titled by the first
    words of the group's docstring ("Data: ..." -> data)."""
    owners = [c for c in reversed(settings.__mro__) if is_dataclass(c)] if isinstance(settings, type) else []
    groups = {}
    for f in fields(settings) if is_dataclass(settings) else settings:
        if "help" not in f.metadata:
            continue
        owner = next((c for c in owners[:-1] if f.name in c.__dict__.get("__annotations__", {})), None)
        if owner is not None and owner not in groups:
            title, _, about = (owner.__doc__ or owner.__name__).partition(": ")
            groups[owner] = parser.add_argument_group(title.lower(), about)
        groups.get(owner, parser).add_argument(f"--{f.name.replace('_', '-')}", default=f.default,
                                               help=f.metadata["help"], **f.metadata["argparse"])


def _named(name, f):
    f.name = name
    return f


def device_flag():
    return flag(None, "cpu, cuda, cuda:1 (default: cuda if available)")


def dtype_flag():
    return flag(None, "default: bfloat16 on CUDA, float32 on CPU", choices=list(DTYPES))


def compile_flag(what):
    return flag(None, f"torch.compile {what} (default: on CUDA; off on a CPU, where it is slower)",
                action=argparse.BooleanOptionalAction)


def add_device_flags(parser, compile_what):
    """--device, --dtype and --compile (what it compiles: compile_what), as every command has them."""
    add_flags(parser, [_named("device", device_flag()), _named("dtype", dtype_flag()),
                       _named("compile", compile_flag(compile_what))])


def check_device(parser, device):
    """--device: 'cpu', 'cuda' or 'cuda:N' that this machine has."""
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


class Refuse:
    """What a check made after parsing passes where it wants an argparse parser: its error() is an InputError
    (exit 1), prefixed with `where`."""

    def __init__(self, where):
        self.where = where

    def error(self, message):
        raise InputError(f"{self.where}: {message}")


def device_type(device):
    """'cuda' or 'cpu': where --device puts a run (None: CUDA if this machine has it)."""
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


def check_fits(model_cfg, needed, what, fix):
    """The one check of "does this fit the model", made before any work wherever tokens are fed to a model: `what`
    (the input: file and line, or the header) needs `needed` positions -> nothing, or InputError naming the
    tokens needed, the model's max_position_embeddings and `fix` (what to change)."""
    have = model_cfg.max_position_embeddings
    if needed > have:
        raise InputError(f"{what} needs {needed:,} positions; the model has {have:,} (max_position_embeddings in its "
                         f"config.json): {fix}")


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
# process set-up


def synchronize(device):
    """Wait for the device's queued work (CUDA runs asynchronously: a clock read without this times the launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during training ask the loop to stop at the end of the step in flight,
    so `last` is saved at a consistent point (weights, optimizer and data position of the same step).
    A second Ctrl-C aborts at once, leaving the newest checkpoint on disk (as a kill -9 would)."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving `last` "
              "(Ctrl-C again to abort without saving)", flush=True)

    def requested(self, dist):
        """Has any rank been asked to stop? (All ranks must agree: saving is a collective.)"""
        return dist.sum(int(self.signum is not None)) > 0

    @property
    def exit_code(self):
        return 128 + (self.signum or signal.SIGINT)
