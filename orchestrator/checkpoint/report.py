"""``orchestrator checkpoints list|verify RUN_DIR``: what a run directory holds and whether it loads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.checkpoint import store
from orchestrator.checkpoint.manifest import Manifest, verify
from orchestrator.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One checkpoint directory and its state."""

    tag: str
    status: str  # valid | damaged | incomplete
    problems: list[str]
    manifest: Manifest | None
    latest: bool


def inspect(run_dir: Path, checksums: bool) -> list[Entry]:
    """Every checkpoint directory of ``run_dir``, oldest first, including saves that never committed."""
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        raise ConfigError(f"RUN_DIR {run_dir}: no checkpoints/ directory; is it a run directory?")
    latest = store.latest_tag(checkpoints)
    entries = []
    for directory in _candidates(checkpoints):
        tag = directory.name
        try:
            manifest: Manifest | None = Manifest.read(directory)
        except ValueError as exc:
            entries.append(Entry(tag=tag, status="incomplete", problems=[str(exc)], manifest=None, latest=False))
            continue
        problems = verify(directory, checksums=checksums)
        status = "damaged" if problems else "valid"
        in_place = directory.parent == checkpoints
        entries.append(Entry(tag=tag if in_place else str(directory.relative_to(checkpoints)), status=status,
                             problems=problems, manifest=manifest, latest=in_place and tag == latest))
    return entries


def _candidates(checkpoints: Path) -> list[Path]:
    dirs = [p for p in checkpoints.iterdir() if p.is_dir() and store.is_tag(p.name)]
    staging = checkpoints / store.STAGING
    if staging.is_dir():
        dirs += [p for attempt in staging.iterdir() if attempt.is_dir() for p in attempt.iterdir() if store.is_tag(p.name)]
    return sorted(dirs, key=lambda p: (store.step_of(p.name), p.parent != checkpoints))


def render(entries: list[Entry], checksums: bool) -> str:
    """A table for the terminal, then the problems of each bad checkpoint."""
    if not entries:
        return "no checkpoints\n"
    rows = [("TAG", "STEP", "STATUS", "LAYOUT (DPxTP)", "SIZE", "SAVED")]
    for e in entries:
        m = e.manifest
        rows.append((
            e.tag + (" (latest)" if e.latest else ""),
            str(m.step) if m else "-",
            e.status,
            f"{m.data_parallel_size}x{m.tensor_parallel}, ZeRO-{m.zero_stage}" if m else "-",
            _size(m.total_bytes) if m else "-",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created)) if m else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for e in entries:
        for problem in e.problems:
            lines.append(f"{e.tag}: {problem}")
    if not checksums:
        lines.append("(sizes checked; `orchestrator checkpoints verify` also checks every checksum)")
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
