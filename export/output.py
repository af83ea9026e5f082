"""Output folders that appear whole or not at all, and never at the cost of the user's files.

- Checked before any work (`check_destination`): `--out` is not empty, not the input, not a folder that holds or
  lies inside the input, not the current folder or one above it; an existing folder is replaced only with
  `--overwrite` and only if it is an earlier export (it holds export_report.json) or empty; its parent is a
  writable folder with room for the estimated output.
- Built in a hidden temporary folder beside the destination, then renamed into place (`staged_folder`). An error,
  Ctrl-C or a `kill` (SIGTERM/SIGHUP) removes the temporary folder; a full disk or a permission error ends in one
  line. A SIGKILL cannot be caught: the next export into the same parent removes what the dead process left
  (the process id is in the name) and says so.
- The published folder gets the mode any `mkdir` would give it (the user's umask), not the temporary folder's 0700.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qwen2_ref.errors import Qwen2Error
from qwen2_ref.progress import status

REPORT = "export_report.json"  # what marks a folder as an export of ours
DISK_MARGIN = 1.10  # free space asked for beyond the estimated output size
_STAGED = re.compile(r"^\..+\.(?:partial|old)-(\d+)-")  # hidden folders staged_folder makes: .NAME.partial-PID-XXXX


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(out: Path | str, overwrite: bool, inputs: tuple[Path | str, ...] = (),
                      need_bytes: float = 0.0) -> Path:
    """Refuse, with one line, an output folder the export must not or cannot write. Returns it as a Path."""
    if not str(out).strip():
        raise Qwen2Error("--out is empty; pass the folder to create, e.g. --out exports/my-model")
    out = Path(out).expanduser()
    try:
        dest = out.resolve()
    except (OSError, RuntimeError) as e:
        raise Qwen2Error(f"--out {out}: not a usable path ({getattr(e, 'strerror', None) or e})") from None
    if len(dest.name.encode()) > 200:  # the staged name adds ~25 bytes; most filesystems allow 255
        raise Qwen2Error(f"--out {out}: the folder name is {len(dest.name.encode())} bytes long; use at most 200")
    if _is_within(Path.cwd().resolve(), dest):
        raise Qwen2Error(f"--out {out} is the current folder or one above it; pass a new folder, e.g. "
                         f"--out exports/my-model")
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if _is_within(src, dest) or _is_within(dest, src):
            what = "is" if src == dest else ("holds" if _is_within(src, dest) else "lies inside")
            raise Qwen2Error(f"--out {out} {what} the input {src}; the export would destroy or mix with its own "
                             "source. Choose a folder outside it")
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise Qwen2Error(f"--out {out} exists and is not a folder; choose another --out")
        entries = [p.name for p in dest.iterdir()]
        if entries and not overwrite:
            raise Qwen2Error(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
        if entries and REPORT not in entries:
            raise Qwen2Error(f"--out {out} holds files but no {REPORT}: it is not an earlier export, so "
                             "--overwrite will not replace it. Remove it yourself or choose another --out")
    parent = dest.parent
    for p in (parent, *parent.parents):  # the nearest existing ancestor must be a writable folder
        if p.exists():
            if not p.is_dir():
                raise Qwen2Error(f"--out {out}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise Qwen2Error(f"--out {out}: {p} is not writable; choose another --out")
            if need_bytes:
                free = shutil.disk_usage(p).free
                if free < need_bytes * DISK_MARGIN:
                    raise Qwen2Error(f"--out {out}: the export needs about {need_bytes / 2**20:,.0f} MiB and "
                                     f"{p} has {free / 2**20:,.0f} MiB free; free some space or choose another --out")
            break
    return out


def remove_stale(parent: Path) -> list[Path]:
    """Remove the staged folders in `parent` whose process is gone (a SIGKILLed export); returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STAGED.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                status(f"note: removed {p}, left by an export that was killed (process {m.group(1)} is gone)")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process: leave its folder alone
    return True


@contextmanager
def staged_folder(out: Path, overwrite: bool, inputs: tuple[Path | str, ...] = (),
                  need_bytes: float = 0.0) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it replaces `out` atomically (the old one removed after)."""
    out = check_destination(out, overwrite, inputs, need_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    previous = _raise_on_termination()
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (isinstance(e, shutil.Error) or e.errno in _WRITE_ERRNOS):
            raise Qwen2Error(f"writing {out} failed: {_describe(e)}; nothing was written") from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO,
                 errno.ENAMETOOLONG}


def _describe(e: OSError) -> str:
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        src, dst, why = e.args[0][0]
        return f"{why} (copying to {Path(dst).name})"
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted"}.get(e.errno, e.strerror)
    return f"{what} ({Path(e.filename).name})" if e.filename else str(what)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
