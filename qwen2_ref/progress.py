"""Progress display on stderr (rich), so stdout stays clean for generated text and tables.

Every long piece of work shows done/total (of one named unit, counted on what is actually processed), a rate and
an ETA. On a terminal that is a live bar; on anything else (a CI log, a pipe, a file) it is plain lines: one at the
start, one at least every PERIOD_S seconds and at every further 1/STEPS of the total (never two within MIN_GAP_S, so a
loop of a second prints its start and end only), and one at the end. QWEN2_QUIET=1 silences all of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

T = TypeVar("T")
console = Console(stderr=True, highlight=False)

PERIOD_S = 10.0  # non-terminal: a progress line at least this often ...
STEPS = 10  # ... and each time another 1/STEPS (10%) of the total is done ...
MIN_GAP_S = 1.0  # ... but never two progress lines within this long
BYTES = "bytes"  # the unit of byte_progress (shown as MiB)
_clock = time.monotonic  # the tests drive a fake clock


def _quiet() -> bool:
    return os.environ.get("QWEN2_QUIET") == "1"


def format_duration(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _amount(n: float, unit: str) -> str:
    return f"{n / 2**20:.1f}" if unit == BYTES else f"{n:.0f}"


def _unit(unit: str) -> str:
    return "MiB" if unit == BYTES else unit


def _rate(per_s: float, unit: str) -> str:
    if unit == BYTES:
        return f"{per_s / 2**20:.1f} MiB/s"
    return f"{per_s:.3g} {unit}/s"


class Meter:
    """Counts work done toward `total` (None: unknown) in `unit`; calling it advances by n (byte_progress's
    `advance(n)`). Subclasses display it; this one (QWEN2_QUIET=1) displays nothing."""

    def __init__(self, description: str, total: float | None, unit: str, approximate: bool = False):
        self.description, self.total, self.unit, self.approximate = description, total, unit, approximate
        self.done = 0.0
        self.t0 = _clock()

    def __call__(self, n: float = 1) -> None:
        self.advance(n)

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)

    def update(self, done: float) -> None:
        self.done = done
        self._show()

    def set_total(self, total: float | None, approximate: bool = False) -> None:
        self.total, self.approximate = total, approximate
        self._show()

    def _show(self) -> None:
        pass

    def start(self, detail: str | None) -> None:
        pass

    def finish(self) -> None:
        pass

    # -- the text of a line ----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return max(_clock() - self.t0, 1e-9)

    def total_text(self) -> str:
        return "?" if self.total is None else ("~" if self.approximate else "") + _amount(self.total, self.unit)

    def progress_line(self) -> str:
        el = self.elapsed()
        rate = self.done / el
        text = f"{self.description}: {_amount(self.done, self.unit)}/{self.total_text()} {_unit(self.unit)}"
        if self.total:
            text += f" ({min(100.0, 100 * self.done / self.total):.0f}%)"
        text += f", {_rate(rate, self.unit)}"
        if self.total is not None and rate > 0:
            text += f", ETA {format_duration(max(self.total - self.done, 0) / rate)}"
        return text

    def final_line(self) -> str:
        el = self.elapsed()
        return (f"{self.description}: {_amount(self.done, self.unit)}/{self.total_text()} {_unit(self.unit)} "
                f"in {format_duration(el)} ({_rate(self.done / el, self.unit)})")

    def start_line(self, detail: str | None) -> str:
        return f"{self.description} ({self.total_text()} {_unit(self.unit)}{'; ' + detail if detail else ''}) ..."


class _Lines(Meter):
    """A non-terminal stderr: periodic plain lines."""

    def start(self, detail: str | None) -> None:
        self._last_t, self._last_step = self.t0, 0
        _say(self.start_line(detail))

    def _show(self) -> None:
        if self.total is not None and self.done >= self.total:
            return  # the final line says it
        now = _clock()
        step = int(self.done * STEPS // self.total) if self.total else 0
        since = now - self._last_t
        if since >= PERIOD_S or (step > self._last_step and since >= MIN_GAP_S):
            self._last_t, self._last_step = now, step
            _say(self.progress_line())

    def finish(self) -> None:
        _say(self.final_line())


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text("?" if task.speed is None else _rate(task.speed, self.unit), style="progress.data.speed")


class _Bar(Meter):
    """A terminal: a live bar with done/total, percent, rate, elapsed and ETA."""

    def start(self, detail: str | None) -> None:
        if detail:
            _say(self.start_line(detail))
        counts = ((DownloadColumn(binary_units=True),) if self.unit == BYTES else
                  (MofNCompleteColumn(), TextColumn(self.unit)))
        cols = (TextColumn("{task.description}"), BarColumn(), *counts, _RateColumn(self.unit), TaskProgressColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self._progress = Progress(*cols, console=console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=self.total)

    def _show(self) -> None:
        self._progress.update(self._task, completed=self.done, total=self.total)

    def finish(self) -> None:  # the bar stays, showing where it ended
        self._progress.stop()


@contextlib.contextmanager
def counter(description: str, total: float | None, unit: str = "items", detail: str | None = None,
            approximate: bool = False) -> Iterator[Meter]:
    """Progress of work counted by the caller: yields a Meter (`m.advance(n)`, `m.update(done)`, `m.set_total`).
    `detail` goes on the start line only. The final line is shown when the block ends normally."""
    if _quiet():
        yield Meter(description, total, unit, approximate)
        return
    m = (_Bar if console.is_terminal else _Lines)(description, total, unit, approximate)
    m.start(detail)
    try:
        yield m
    except BaseException:
        if isinstance(m, _Bar):
            m.finish()  # no final line for _Lines: the error says what happened
        raise
    m.finish()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "items",
          detail: str | None = None) -> Iterator[T]:
    """Iterate with progress; the count is of the items yielded (`total` defaults to len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with counter(description, total, unit, detail) as m:
        for it in items:
            yield it
            m.advance()


def byte_progress(description: str, total: int, approximate: bool = False):
    """Byte-counting progress (shown in MiB, with rate and ETA); yields the Meter, called as `advance(n)`."""
    return counter(description, total, BYTES, approximate=approximate)


def _say(line: str) -> None:
    console.print(line, soft_wrap=True, markup=False)  # one line in a log, however wide; paths print as written


def status(msg: str) -> None:
    if not _quiet():
        console.print(msg, soft_wrap=True)
