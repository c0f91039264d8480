"""medrec's one exception family and the one-line form of every user-facing failure.

Every failure a user can cause (bad data, bad option, unreadable checkpoint) raises a
``MedRecError`` subclass; the command lines (``train.py``, ``medrec-prepare``,
``benchmarks/run.py``) print it as one ``<prog>: error: ...`` line and exit with code 2.
``MEDREC_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

EXIT_USER_ERROR = 2


class MedRecError(ValueError):
    """Base of every user-facing medrec failure: the message names the file or option and the rule."""


class OptionError(MedRecError):
    """An option value outside its documented range."""


class CheckpointError(MedRecError):
    """A checkpoint that is missing, unreadable, truncated or of another kind."""


def debug_enabled() -> bool:
    """``MEDREC_DEBUG=1`` (or any value but 0/false/empty): show tracebacks instead of one line."""
    return os.environ.get("MEDREC_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from (jsonargparse wraps errors of ``__init__``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user-facing failure, or None for a bug (which keeps its traceback)."""
    for cause in causes(err):
        if isinstance(cause, MedRecError):
            return " ".join(str(cause).split())
        if isinstance(cause, argparse.ArgumentError):
            return option_error_line(str(cause))
    return instantiation_error_line(err)


def instantiation_error_line(err: BaseException) -> str | None:
    """A ValueError that a model's or DataModule's ``__init__`` raised for its arguments while
    jsonargparse instantiated it (wrapped as "Does not validate ..."): one line naming the class."""
    wrapped = str(err)
    if not (isinstance(err, ValueError) and wrapped.startswith("Does not validate against any of the Union")):
        return None
    inner = err.__cause__
    if not isinstance(inner, ValueError) or str(inner).startswith("Does not validate"):
        return None
    class_path = re.search(r"class_path='([^']+)'", wrapped)
    option = "--data" if "LightningDataModule" in wrapped else "--model" if "MedRecModule" in wrapped else "option"
    where = f"{option} {class_path.group(1)}" if class_path else option
    return f"{where}: {' '.join(str(inner).split())}"


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value type:", "- Expected a <class 'NoneType'>")


def option_error_line(message: str) -> str:
    """jsonargparse's nested, many-line parse error as one line naming the option.

    ``Parser key "model": ... Problem with given class_path 'X': Parser key "lr": Not of type
    PositiveFloat: -1 does not conform to restriction v>0`` ->
    ``option --model.init_args.lr: Not of type PositiveFloat: -1 does not conform to restriction v>0``
    """
    path: list[str] = []
    reason = value = None
    nested = False
    for line in message.splitlines():
        text = line.strip()
        key = re.match(r'Parser key "([^"]+)":\s*(.*)$', text)
        if key:
            path += ["init_args", key.group(1)] if nested and path else [key.group(1)]
            nested, reason, value = False, key.group(2) or None, None
        elif text.startswith("- Problem with given class_path"):
            nested = True
        elif text.startswith("Given value:") and value is None:
            value = text.split(":", 1)[1].strip()
            nested_arg = re.fullmatch(r"NestedArg\(key='[^']*', val=(.*)\)", value)
            value = nested_arg.group(1).strip("'") if nested_arg else value
        elif text and not text.startswith(_NOISE) and reason is None:
            reason = text.removeprefix("- ")
    if not path:
        return " ".join(message.split())
    if nested:
        path.append("init_args")
    line = f"option --{'.'.join(path)}"
    shown = reason is not None and (f"{value} does not" in reason or "Got value" in reason or "Option " in reason)
    if value is not None and not shown:
        line += f" = {value}"
    return f"{line}: {reason or 'invalid value'}"


def run_reporting_errors(prog: str, action: Callable[[], object]) -> object:
    """Run ``action``; a user-facing failure becomes one ``prog: error: ...`` line and exit code 2."""
    try:
        return action()
    except SystemExit:
        raise
    except Exception as err:
        message = user_message(err)
        if message is None or debug_enabled():
            raise
        fail(prog, message)


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)
