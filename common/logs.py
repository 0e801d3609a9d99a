"""Logging set-up shared by the command-line tools: timestamps on stderr, stdout left for results."""
from __future__ import annotations

import logging
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure(level: str = "INFO", log_file: str | None = None) -> None:
    """Raises ValueError for an unknown level and OSError for a log file that cannot be opened."""
    if level.upper() not in LEVELS:
        raise ValueError(f"unknown --log-level {level!r}; use one of {', '.join(LEVELS)}")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(program: str, message: str, code: int = 2) -> int:
    """Print the one sentence a user needs (what is wrong, what to do) and return the exit code."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    return code


def brief(error: BaseException, line: int = 0, limit: int = 200) -> str:
    """One line of an exception's message, for an error sentence: its first (or, with line=-1, its last)
    line, cut to `limit` characters; the exception's type when it has no message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[line][:limit]


def safe(value: object, limit: int = 64) -> str:
    """A value a peer sent (a client id, a device, a metric name), fit for one log line: control and other
    unprintable characters escaped (a newline cannot forge a line), cut to `limit` characters with "..." saying
    so."""
    text = str(value)
    cut = len(text) > limit
    text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text + "..." if cut else text
