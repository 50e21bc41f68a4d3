"""What every command shares: the InputError a user's mistake raises, and its one-line report.

The commands (generate.py, convert.py, distill.py, bench.py, toy.py) end on a user's mistake with
one line, `prog: error: <what is wrong, and what to do>`, on stderr and exit status 2, as argparse
ends a bad flag; a bug keeps its traceback. This is the lowest module of the project: the model
and the input processing raise InputError without importing any command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch


class InputError(ValueError):
    """A mistake in what the user gave: a flag's value, a checkpoint's contents, a data file, an image.

    Its message says what is wrong and what to do. The commands end on it, and on an OSError (a
    missing file, no network), with that one line (see `user_errors`).
    """


@contextlib.contextmanager
def user_errors(prog: str, *more: type[Exception]):
    """The commands' error convention, as a decorator of a command's main (or around a block).

    An InputError, an OSError (a missing file, no network) or one of `more` ends the program with one
    line, `prog: error: <what is wrong, and what to do>`, on stderr and exit status 2. Any other
    exception is a bug and keeps its traceback.
    """
    try:
        yield
    except (InputError, OSError, *more) as error:
        print(f"{prog}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str) -> torch.device:
    """A --device value as a torch.device; InputError when this machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if device is None or device.type != "cpu" and (accelerator is None or device.type != accelerator.type
                                                   or (device.index or 0) >= count):
        here = "cpu" if accelerator is None else f"cpu, {accelerator.type} or {accelerator.type}:N for N < {count}"
        raise InputError(f"--device {name}: no such device on this machine; use {here}")
    return device


def check_bounds(args: argparse.Namespace, at_least: dict[str, float] | None = None,
                 above: dict[str, float] | None = None) -> None:
    """InputError naming the first flag (an attribute of args) whose value is below its bound:
    `at_least` bounds are allowed values, `above` bounds are not. A None value (unset) passes."""
    for bounds, words, allowed in ((at_least or {}, "at least", lambda value, bound: value >= bound),
                                   (above or {}, "more than", lambda value, bound: value > bound)):
        for name, bound in bounds.items():
            value = getattr(args, name)
            if value is not None and not allowed(value, bound):
                raise InputError(f"--{name.replace('_', '-')} must be {words} {bound}, not {value}")


def write_json(path: str | Path, payload: dict) -> None:
    """Write results so far, atomically: an interrupted run leaves the last complete file (bench.py, toy.py)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
