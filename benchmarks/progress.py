"""Feedback while a suite runs: one tqdm bar per long stage (steps or samples, tokens/s, its key metric) and a line
per stage with its rank in the suite and the elapsed time. Bars draw only when stdout is a terminal (tqdm's
``disable=None``); piped to a file, the output stays one line per stage."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator

from tqdm.auto import tqdm

_enabled = {"bars": True}


def set_enabled(on: bool) -> None:
    """Bars on or off in this process (off in a worker process: the main process prints one line per stage)."""
    _enabled["bars"] = on


def is_terminal() -> bool:
    return sys.stdout.isatty()


class Bar:
    """A tqdm bar (or nothing off a terminal) that trainers' ``on_log`` records move."""

    def __init__(self, total: int | None, desc: str, unit: str = "step"):
        # a pseudo-terminal may report a 0 x 0 size (tqdm then hides the bar): the COLUMNS/LINES or 100 x 20 there
        size = shutil.get_terminal_size((100, 20))
        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0,
                         disable=None if _enabled["bars"] else True,
                         ncols=size.columns, nrows=size.lines)

    def to(self, n: int, **metrics: float) -> None:
        """Move to position ``n`` (a trainer's step / iteration count) and show ``metrics``."""
        if self._bar.disable:
            return
        self._bar.update(max(0, int(n) - self._bar.n))
        self.show(**metrics)

    def add(self, n: int = 1, **metrics: float) -> None:
        if self._bar.disable:
            return
        self._bar.update(n)
        self.show(**metrics)

    def show(self, **metrics: float) -> None:
        shown = {k: f"{v:.3g}" for k, v in metrics.items() if isinstance(v, int | float)}
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def bar(total: int | None, desc: str, unit: str = "step") -> Iterator[Bar]:
    b = Bar(total, desc, unit)
    try:
        yield b
    finally:
        b.close()


def write(line: str) -> None:
    """A log line above any bars (tqdm.write), so a suite's summary bar stays at the bottom."""
    tqdm.write(line)
