"""Progress bars that behave in log files.

On a terminal this is tqdm. When stderr is not a terminal (a log file, a pipe, a CI job), tqdm's
carriage-return redraws would pile up in the file (a calibration log grew past a megabyte), so the
bar becomes a few plain lines instead: one per tenth of the work, at most one every `interval`
seconds, and one at the end.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm as _tqdm


def progress_bar(iterable=None, desc: str = "", unit: str = "it", disable: bool = False, total: int | None = None,
                 **kwargs):
    """tqdm's signature and object (iterate it, `set_postfix` on it); plain lines off a terminal."""
    if disable or _stderr_is_terminal():
        return _tqdm(iterable, desc=desc, unit=unit, disable=disable, total=total, **kwargs)
    return PlainProgress(iterable, desc, unit, total)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class PlainProgress:
    """What a log file gets instead of a bar: `desc: 30/120 tensor (25%), 1.2 s, loss=0.41`."""

    def __init__(self, iterable, desc: str, unit: str, total: int | None, interval: float = 10.0):
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        if total is None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total = total
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, n: int, start: float) -> None:
        done = f"{n}/{self.total} {self.unit} ({n / self.total:.0%})" if self.total else f"{n} {self.unit}"
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}, {time.perf_counter() - start:.1f} s{tail}", file=sys.stderr, flush=True)

    def __iter__(self):
        start = last = time.perf_counter()
        n, next_tenth = 0, 1
        for item in self.iterable:
            yield item
            n += 1
            now = time.perf_counter()
            tenth_passed = self.total and n * 10 >= next_tenth * self.total
            if tenth_passed:
                next_tenth = n * 10 // self.total + 1
            if n != self.total and (tenth_passed or not self.total) and now - last >= self.interval:
                self._line(n, start)
                last = now
        self._line(n, start)
