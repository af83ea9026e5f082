"""Output folders that appear whole or not at all: build in a hidden temporary folder beside the destination,
verify, then rename into place. An error, Ctrl-C or a `kill` (SIGTERM/SIGHUP) removes the temporary folder."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qwen2_ref.errors import Qwen2Error


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise Qwen2Error(f"{out} exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise Qwen2Error(f"{out} exists and is not a folder; choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise Qwen2Error(f"{parent} is not writable; choose another --out")


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it replaces `out` atomically (the old one removed after)."""
    out = Path(out)
    check_destination(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    previous = _raise_on_termination()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Terminated(SystemExit):
    """SIGTERM/SIGHUP during an export: unwinds like Ctrl-C so the temporary folder is removed."""


def _raise_on_termination() -> dict:
    """A job scheduler's `kill` must not leave a half-written folder: turn SIGTERM/SIGHUP into an exception
    (exit status 128 + signal). Returns the handlers to restore. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        print(f"terminated by signal {signum}: the partial output is removed", file=sys.stderr, flush=True)
        raise Terminated(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    return previous
