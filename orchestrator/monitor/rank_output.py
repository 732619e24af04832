"""Ranks' own output on the user's terminal (``train.show_output``), as torchrun shows it.

Each rank's stdout and stderr go to ``RUN_DIR/logs/rankN.log`` (a promoted spare writes its new rank's
file too). This follows the chosen ranks' files from the controller and shows each new complete line as
a note, ``[rank N] LINE``; the orchestrator's own header lines (``=== ... ===``) are left out.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.monitor.progress import ProgressDisplay

_HEADER = "=== "
_READ_LIMIT = 1 << 16  # bytes a look reads from one file: a chatty rank cannot hold up the controller


class RankOutput:
    """Follows ``logs/rankN.log`` of ``ranks`` and shows their new lines on ``display``."""

    def __init__(self, logs: Path, ranks: list[int], display: ProgressDisplay) -> None:
        self._files = {rank: logs / f"rank{rank}.log" for rank in ranks}
        self._offsets = dict.fromkeys(ranks, 0)
        self._partial = dict.fromkeys(ranks, b"")
        self._display = display

    def look(self) -> None:
        """Show what the ranks wrote since the last look (complete lines only)."""
        for rank, path in self._files.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(self._offsets[rank])
                    data = fh.read(_READ_LIMIT)
            except OSError:
                continue  # not there yet
            if not data:
                continue
            self._offsets[rank] += len(data)
            *lines, self._partial[rank] = (self._partial[rank] + data).split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip("\r")
                if not text.startswith(_HEADER):
                    self._display.note(f"[rank {rank}] {text}")
