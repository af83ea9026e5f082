"""Progress display on stderr (rich), so stdout stays clean for generated text and tables."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

T = TypeVar("T")
console = Console(stderr=True, highlight=False)


def _quiet() -> bool:
    return os.environ.get("QWEN2_QUIET") == "1"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar; a non-terminal stderr gets one line at the start and one at the end."""
    if _quiet():
        yield from items
        return
    if not console.is_terminal:
        t0 = time.perf_counter()
        console.print(f"{description} ...")
        yield from items
        console.print(f"{description}: done in {time.perf_counter() - t0:.1f} s")
        return
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn())
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for it in items:
            yield it
            p.advance(task)


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator["callable"]:
    """A byte-counting bar; yields `advance(n)`."""
    if _quiet() or not console.is_terminal:
        if not _quiet():
            console.print(f"{description} ({total / 2**20:.0f} MiB) ...")
        yield lambda n: None
        return
    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*cols, console=console) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


def status(msg: str) -> None:
    if not _quiet():
        console.print(msg)

