"""What a person reads on the terminal during `rayllm run`: rayllm's stage lines, its progress
bars, its warnings and errors. Everything else (Ray's and Ray Data's notices, worker output,
vLLM, DeepSpeed and torch messages and warnings) goes to RUN_DIR/logs/run.log, named on the
console at the start; `--verbose` leaves the terminal as it was.

Redirecting file descriptors 1 and 2, not only `sys.stdout`, is what catches it all: C++ logs,
subprocesses (DeepSpeed's op builds), Ray's printing of worker lines and handlers that libraries
bound to the streams at import. rayllm's own lines then go to a duplicate of the original
terminal descriptor, and into the log too, so the log alone tells the whole story.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator, TextIO

# The real stdout and stderr while the console is quiet (fds 1 and 2 then go to the log).
_TERMINAL: TextIO | None = None
_TERMINAL_ERR: TextIO | None = None


def bar_stream() -> TextIO:
    """Where progress bars draw: the terminal's stderr, also while the rest goes to the log."""
    return _TERMINAL_ERR or sys.stderr


def say(*args, **kw) -> None:
    """A line for the person at the terminal (and for the log file, when there is one), with
    secrets (rayllm/redact.py) masked: stage lines print config values and error texts."""
    from rayllm.redact import redact_text

    kw.pop("file", None)
    kw.pop("flush", None)
    text = redact_text(kw.pop("sep", " ").join(map(str, args)))
    print(text, file=_TERMINAL or sys.stdout, flush=True, **kw)
    if _TERMINAL is not None:
        print(text, file=sys.stdout, flush=True, **kw)


class _TerminalHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


@contextlib.contextmanager
def quiet(log_path: Path, verbose: bool = False) -> Iterator[Path | None]:
    """Send fds 1 and 2 to `log_path` for the block, rayllm's lines and warnings to the terminal."""
    if verbose:
        yield None
        return
    global _TERMINAL, _TERMINAL_ERR
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    logf = open(log_path, "a", buffering=1)
    os.dup2(logf.fileno(), 1)
    os.dup2(logf.fileno(), 2)
    _TERMINAL = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    _TERMINAL_ERR = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    rlog = logging.getLogger("rayllm")
    handler = _TerminalHandler(logging.WARNING)
    handler.setFormatter(logging.Formatter("[rayllm] %(levelname)s: %(message)s"))
    rlog.addHandler(handler)
    rlog.propagate = False  # once on the terminal; say() also writes it to the log
    say(f"[rayllm] log: {log_path} (Ray, worker and library output; --verbose shows it here)")
    try:
        yield log_path
    except BaseException:
        traceback.print_exc(file=sys.stdout)  # into the log; Python prints it on the terminal too
        raise
    finally:
        rlog.removeHandler(handler)
        rlog.propagate = True
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _TERMINAL.close()
        _TERMINAL_ERR.close()
        _TERMINAL = _TERMINAL_ERR = None
        logf.close()


def bar(**kw):
    """A tqdm progress bar on the terminal. In a terminal it redraws in place; into a file (CI
    logs) it would write a line per update, so there it writes one every 15 s."""
    from tqdm.auto import tqdm

    out = bar_stream()
    return tqdm(file=out, mininterval=0.2 if out.isatty() else 15.0, **kw)
