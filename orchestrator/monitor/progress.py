"""Terminal progress: a live rich display on a terminal, plain throttled lines otherwise."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

_PLAIN_INTERVAL_S = 1.0


class ProgressDisplay(Protocol):
    """What the controller tells the user while a job runs."""

    def step(self, step: int, total: int | None, loss: float | None, tokens_per_s: float | None) -> None:
        """Step ``step`` of ``total`` (None: not known) is done."""

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def make_progress(stream: TextIO = sys.stderr) -> ProgressDisplay:
    """Rich live display when ``stream`` is a terminal, plain lines otherwise."""
    return RichProgress(stream) if stream.isatty() else PlainProgress(stream)


class PlainProgress:
    """One line per second at most (and always the last step), for logs and CI."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last_print = 0.0
        self._recent: deque[tuple[float, int]] = deque(maxlen=20)

    def step(self, step: int, total: int | None, loss: float | None, tokens_per_s: float | None) -> None:
        now = time.monotonic()
        self._recent.append((now, step))
        if now - self._last_print < _PLAIN_INTERVAL_S and step != total:
            return
        self._last_print = now
        rate = f"  tok/s {tokens_per_s:,.0f}" if tokens_per_s else ""
        eta = _eta(self._recent, total) if total is not None else ""
        of = f"/{total}" if total is not None else ""
        shown = f"  loss {loss:.4f}" if loss is not None else ""
        self._stream.write(f"step {step}{of}{shown}{rate}{eta}\n")
        self._stream.flush()

    def note(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class RichProgress:
    """A live bar with step, loss, tokens/s and ETA; notes scroll above it."""

    def __init__(self, stream: TextIO) -> None:
        self._console = Console(file=stream)
        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("tok/s {task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._task = None

    def step(self, step: int, total: int | None, loss: float | None, tokens_per_s: float | None) -> None:
        fields = {"rate": f"{tokens_per_s:,.0f}" if tokens_per_s else "-"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=step, **{"loss": "-", **fields})
        self._bar.update(self._task, completed=step, total=total, **fields)

    def note(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._bar.stop()


def _eta(recent: deque[tuple[float, int]], total: int) -> str:
    if len(recent) < 2:
        return ""
    (t0, s0), (t1, s1) = recent[0], recent[-1]
    if s1 <= s0:
        return ""
    seconds = (t1 - t0) / (s1 - s0) * (total - s1)
    return f"  eta {int(seconds) // 60}:{int(seconds) % 60:02d}"
